"""The agent with ``--source kubernetes`` on the real kernel, against the fake API server.

Pods are podlab pods whose processes sit in a cgroup named like the kubelet's (``pod<UID>``), so
the agent finds their network namespaces exactly as on a node: by scanning /proc for the UID.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TEST_PREFIX
from support.agentproc import SOCKOPS, AgentProcess, agents, wait_for
from support.podtraffic import _read_json_line, popen_piped, start_echo_server
from test_agent import Transfer

from lab.cgroups import Cgroup
from lab.kubeapi import FakeKubeAPI
from lab.podlab import Lab, Pod
from sockops import loader, netns

pytestmark = pytest.mark.kernel

ON = {"sockops.io/accelerate": "true"}
OFF = {"sockops.io/accelerate": "false"}


@dataclass
class KubeEnv:
    api: FakeKubeAPI
    cgroup: Cgroup
    lab: Lab
    bpffs: Path
    tmp: Path
    started: list[AgentProcess]
    next_ip: int = 10

    def pod(self, name: str, namespace: str = "default", annotations: dict[str, str] | None = None,
            node: str = "node-a") -> tuple[str, Pod]:  # fmt: skip
        """A pod in the API and a running pod (echo server) whose cgroup holds its UID."""
        uid = str(uuid.uuid4())
        cg = self.cgroup.path / "kubepods" / f"pod{uid}"
        cg.mkdir(parents=True)
        self.next_ip += 1
        pod = self.lab.add_pod(name, ip=f"10.244.4.{self.next_ip}", sidecar=False, cgroup=cg)
        start_echo_server(pod, self.tmp, host="127.0.0.1")
        self.api.add_pod(name, namespace, node, annotations=annotations, uid=uid)
        return uid, pod

    def agent(self, *extra: str) -> AgentProcess:
        a = AgentProcess(
            self.cgroup.path,
            self.bpffs,
            self.tmp,
            ["--source", "kubernetes", "--node-name", "node-a", "--kubeconfig", str(self.kubeconfig()),
             *extra],
        )  # fmt: skip
        self.started.append(a)
        return a

    def kubeconfig(self) -> Path:
        path = self.tmp / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.api.url}'}}}}]\n"
            "users: [{name: fake, user: {}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
            "current-context: fake\n"
        )
        return path

    def enabled(self) -> set[int]:
        with loader.PinnedMaps(self.bpffs) as m:
            return set(m.enabled())


@pytest.fixture
def kube(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[KubeEnv]:
    api = FakeKubeAPI().start()
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-kube-{secrets.token_hex(4)}"
    try:
        with agents(cgroup.path, bpffs) as started:
            yield KubeEnv(api, cgroup, lab, bpffs, tmp_path, started)
    finally:
        api.close()


def cookie(pod: Pod) -> int:
    return netns.cookie(pod.netns_path)


def test_opt_in_rules_live_changes_and_deletion(kube: KubeEnv) -> None:
    kube.api.add_namespace("shop", {"sockops.io/accelerate": "enabled"})
    kube.api.add_namespace("default")
    # pre-existing pods: picked up by the first list
    uid_a, shop_a = kube.pod("shop-a", "shop")
    _, plain = kube.pod("plain", "default")
    _, elsewhere = kube.pod("other-node", "default", ON, node="node-b")
    agent = kube.agent().wait_ready()
    assert kube.enabled() == {cookie(shop_a)}

    # a pod created later, opted in by its annotation
    uid_b, pod_b = kube.pod("opted", "default", ON)
    wait_for(lambda: cookie(pod_b) in kube.enabled(), 10, "annotated pod enabled")
    Transfer(pod_b, seconds=0.5).assert_intact()
    with loader.PinnedMaps(kube.bpffs) as m:
        assert m.netns_stats()[cookie(pod_b)]["redirected_bytes"] > 0

    # annotation on -> off -> on
    kube.api.update_pod(uid_b, annotations=OFF)
    wait_for(lambda: cookie(pod_b) not in kube.enabled(), 10, "annotation off")
    kube.api.update_pod(uid_b, annotations=ON)
    wait_for(lambda: cookie(pod_b) in kube.enabled(), 10, "annotation on again")

    # namespace default off, a pod's annotation wins over it
    kube.api.label_namespace("shop", {"sockops.io/accelerate": "disabled"})
    wait_for(lambda: cookie(shop_a) not in kube.enabled(), 10, "namespace label off")
    kube.api.update_pod(uid_a, annotations=ON)
    wait_for(lambda: cookie(shop_a) in kube.enabled(), 10, "pod annotation overrides namespace")

    # deletion
    kube.api.delete_pod(uid_b)
    wait_for(lambda: cookie(pod_b) not in kube.enabled(), 10, "deleted pod disabled")

    # never: the pod without opt-in, the pod of another node
    assert cookie(plain) not in kube.enabled() and cookie(elsewhere) not in kube.enabled()
    state = agent.state()
    assert state["plain"]["state"] == "off" and state["plain"]["reason"] == "not opted in"
    assert "other-node" not in state

    # every change was enforced, and its latency recorded
    assert agent.metric("sockops_enforce_latency_seconds_count") >= 6
    assert agent.metric("sockops_pods_accelerated") == 1


def test_invalid_annotation_is_reported_and_counted(kube: KubeEnv) -> None:
    kube.api.add_namespace("default")
    _, pod = kube.pod("typo", "default", {"sockops.io/accelerate": "yes"})
    agent = kube.agent().wait_ready()
    st = agent.state()["typo"]
    assert st["state"] == "off" and 'write "true" or "false"' in st["errors"][0]
    assert agent.metric("sockops_reconcile_errors_total", source="kubernetes") >= 1
    assert cookie(pod) not in kube.enabled()


def test_api_outage_keeps_acceleration_and_recovers(kube: KubeEnv) -> None:
    kube.api.add_namespace("default")
    uid, pod = kube.pod("steady", "default", ON)
    agent = kube.agent().wait_ready()
    restarts0 = agent.metric("sockops_watch_restarts_total", source="kubernetes") or 0

    t = Transfer(pod, seconds=4.0)
    requests0 = len(kube.api.requests)
    kube.api.fail_next(10_000)
    kube.api.drop_watches()
    # the source keeps retrying (answered 500) while the pod stays accelerated
    wait_for(lambda: len(kube.api.requests) >= requests0 + 2, 15, "the source to retry during the outage")
    assert agent.get("/healthz")[0] == 200
    assert cookie(pod) in kube.enabled(), "an API outage switched a pod off"
    t.assert_intact()

    # the API comes back: the watch is re-established (counted) and a change made meanwhile is seen
    kube.api.clear_failures()
    kube.api.update_pod(uid, annotations=OFF)
    wait_for(lambda: cookie(pod) not in kube.enabled(), 45, "change after the outage")
    assert (agent.metric("sockops_watch_restarts_total", source="kubernetes") or 0) > restarts0


# -- the breaker (issue 12, item 2; sockops/breaker.py) -------------------------------------------

STALLED_READER = Path(__file__).resolve().parent / "support" / "stalled_reader.py"
RESET = "sockops.io/breaker-reset"


class StalledReader:
    """tests/support/stalled_reader.py in the pod: a connection whose reader stops reading while
    its sender writes 32 MiB (over the 4 MiB queue budget), held until :meth:`finish`."""

    def __init__(self, pod: Pod) -> None:
        self.proc = popen_piped(
            pod, [sys.executable, str(STALLED_READER), "--total", str(32 << 20), "--hold"]
        )
        self.stalled = _read_json_line(self.proc, 60, "stalled reader")

    def finish(self) -> dict[str, object]:
        """Let the reader read: every byte must arrive in order (sha256 of both ends)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        try:
            out, err = self.proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail("the stalled reader's resumed transfer hung")
        assert self.proc.returncode == 0, err
        done = json.loads(out.strip().splitlines()[-1])
        assert done["received"] == done["sent"] == 32 << 20, done
        assert done["sha_received"] == done["sha_sent"], done
        return done


def suspended(agent: AgentProcess, name: str) -> bool:
    return agent.state().get(name, {}).get("state") == "suspended"


def test_breaker_suspends_a_pod_that_does_not_read_and_the_annotation_resets_it(kube: KubeEnv) -> None:
    kube.api.add_namespace("default")
    uid, pod = kube.pod("stuck", "default", {**ON, RESET: "0"})
    agent = kube.agent("--breaker-thresholds", "queue_over_budget=1").wait_ready()
    assert cookie(pod) in kube.enabled()
    live = Transfer(pod, seconds=6.0)  # a connection of the pod that runs across the trip

    stuck = StalledReader(pod)
    assert stuck.stalled["backpressure"], stuck.stalled
    wait_for(lambda: suspended(agent, "stuck"), 15, "the pod suspended")
    st = agent.state()["stuck"]
    assert st["breaker"]["kind"] == "queue_over_budget", st
    assert st["breaker"]["pid"] == stuck.stalled["pid"] and st["breaker"]["comm"] == "stalled-sender", st
    assert "stalled-sender" in st["reason"] and str(stuck.stalled["pid"]) in st["reason"], st
    assert cookie(pod) not in kube.enabled()  # new connections of the pod are not accelerated
    m = {"namespace": "default", "pod": "stuck"}
    assert agent.metric("sockops_app_anomalies_total", **m, kind="queue_over_budget") == 1
    assert agent.metric("sockops_breaker_open", **m) == 1

    # `sockops status`, the agent's /status (the kubectl plugin's source), and the pod's Event
    out = subprocess.run(
        [*SOCKOPS, "status", "--bpffs", str(kube.bpffs), "--state-file", str(agent.state_file),
         "--cgroup", str(kube.cgroup.path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "default/stuck" in x)
    assert "suspended" in line and "stalled-sender" in line, out.stdout
    assert f"breaker: queue_over_budget by stalled-sender (pid {stuck.stalled['pid']})" in out.stdout
    status = json.loads(agent.get("/status")[1])
    assert [w["state"] for w in status["workloads"] if w["name"] == "stuck"] == ["suspended"]

    def suspended_events() -> list[dict[str, object]]:
        return [e for e in kube.api.events if e["reason"] == "AccelerationSuspended"]

    wait_for(suspended_events, 10, "the AccelerationSuspended Event")
    ev = suspended_events()[0]
    assert ev["type"] == "Warning" and ev["involvedObject"]["uid"] == uid, ev
    assert "stalled-sender" in ev["message"] and str(stuck.stalled["pid"]) in ev["message"], ev

    # the live connections stayed intact: the stalled one reads every byte in order, the other too
    stuck.finish()
    live.assert_intact()
    assert suspended(agent, "stuck")  # no cool-down: only the annotation resets it

    kube.api.update_pod(uid, annotations={**ON, RESET: "1"})
    wait_for(lambda: cookie(pod) in kube.enabled(), 10, "the reset annotation re-enables the pod")
    wait_for(lambda: agent.state()["stuck"]["state"] == "accelerated", 10, "accelerated again")
    assert agent.metric("sockops_breaker_open", **m) == 0
    Transfer(pod, seconds=0.5).assert_intact()


def test_breaker_cooldown_reenables_the_pod(kube: KubeEnv) -> None:
    kube.api.add_namespace("default")
    _, pod = kube.pod("stuck", "default", ON)
    agent = kube.agent("--breaker-cooldown", "3", "--breaker-thresholds", "queue_over_budget=1").wait_ready()
    stuck = StalledReader(pod)
    wait_for(lambda: suspended(agent, "stuck"), 15, "the pod suspended")
    assert cookie(pod) not in kube.enabled()
    stuck.finish()
    wait_for(lambda: cookie(pod) in kube.enabled(), 15, "the cool-down re-enables the pod")
    # the state file is written at the end of the pass that wrote the map
    wait_for(lambda: agent.state()["stuck"]["state"] == "accelerated", 5, "the pod accelerated again")
    assert (
        agent.metric(
            "sockops_app_anomalies_total", namespace="default", pod="stuck", kind="queue_over_budget"
        )
        == 1
    )
