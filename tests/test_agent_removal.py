"""Removal or upgrade: the agent drains and uninstalls on SIGTERM only when its DaemonSet goes.

Through the fake API server: the agent's own pod (owned by the DaemonSet ``sockops``), an
accelerated app pod with a long sha256-checked stream, then either the DaemonSet kept (an
upgrade: programs and pins stay, the stream keeps being accelerated) or deleted the way
``kubectl delete -k`` does (background propagation) or foreground: the agent drains, the stream
finishes intact, and nothing is left attached or pinned.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEST_PREFIX
from support.agentproc import AgentProcess, agents, wait_for
from test_agent import Transfer
from test_agent_kubernetes import ON, KubeEnv, cookie
from test_agent_lifecycle import stop_seconds

from lab.cgroups import Cgroup
from lab.kubeapi import FakeKubeAPI
from lab.podlab import Lab
from sockops import loader

pytestmark = pytest.mark.kernel

AGENT_NS, DS, AGENT_POD = "sockops-system", "sockops", "sockops-7xk2p"


@pytest.fixture
def kenv(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[KubeEnv]:
    api = FakeKubeAPI().start()
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-rm-{secrets.token_hex(4)}"
    try:
        with agents(cgroup.path, bpffs) as started:
            yield KubeEnv(api, cgroup, lab, bpffs, tmp_path, started)
    finally:
        api.close()


def start_agent(kube: KubeEnv) -> AgentProcess:
    """The agent as the DaemonSet runs it: its pod, owned by the DaemonSet, named in its env."""
    kube.api.add_namespace(AGENT_NS)
    ds_uid = kube.api.add_daemonset(DS, AGENT_NS)
    uid = kube.api.add_pod(AGENT_POD, AGENT_NS, "node-a")
    owner = {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": DS, "uid": ds_uid, "controller": True}
    kube.api.update_pod(uid, lambda p: p["metadata"].__setitem__("ownerReferences", [owner]))
    a = AgentProcess(
        kube.cgroup.path,
        kube.bpffs,
        kube.tmp,
        ["--source", "kubernetes", "--node-name", "node-a", "--kubeconfig", str(kube.kubeconfig()),
         "--resync", "30"],
        env={"POD_NAME": AGENT_POD, "POD_NAMESPACE": AGENT_NS, "SOCKOPS_DRAIN_TIMEOUT": "30"},
    )  # fmt: skip
    kube.started.append(a)
    return a.wait_ready()


def watching(kube: KubeEnv) -> bool:
    return any(r.watch for r in kube.api.requests_of("daemonsets"))


def soon(cond: Callable[[], object], timeout: float) -> bool:
    """Wait for ``cond`` up to ``timeout``; the test goes on either way and checks the outcome."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(cond())


def accelerated_stream(kube: KubeEnv, seconds: float) -> tuple[Transfer, object]:
    kube.api.add_namespace("default")
    _, pod = kube.pod("app", "default", ON)
    wait_for(lambda: cookie(pod) in kube.enabled(), 15, "app pod enabled")
    before = kube_stats(kube, pod)
    t = Transfer(pod, seconds=seconds)
    wait_for(lambda: kube_stats(kube, pod) > before + 100_000, 10, "the stream to be accelerated")
    return t, pod


def kube_stats(kube: KubeEnv, pod: object) -> int:
    with loader.PinnedMaps(kube.bpffs) as m:
        return m.netns_stats().get(cookie(pod), {}).get("redirected_bytes", 0)  # type: ignore[arg-type]


def test_upgrade_keeps_everything_attached(kenv: KubeEnv) -> None:
    agent = start_agent(kenv)
    soon(lambda: watching(kenv), 10)  # the agent watches its DaemonSet
    t, pod = accelerated_stream(kenv, seconds=4.0)
    assert stop_seconds(agent) < 2.0  # the pod is replaced, the DaemonSet stays
    attached = loader.attached_programs(kenv.cgroup.path, kenv.bpffs)
    counts = {kind: len(progs) for kind, progs in attached.items()}
    assert counts == {"sock_ops": 1, "sk_msg": 1, "skb_egress": 1}, attached
    mid = kube_stats(kenv, pod)
    wait_for(lambda: kube_stats(kenv, pod) > mid + 100_000, 10, "acceleration without an agent")
    t.assert_intact()
    assert not any("draining" in str(line.get("msg")) for line in agent.log_lines())


@pytest.mark.parametrize("foreground", [False, True], ids=["kubectl-delete", "foreground"])
def test_deleting_the_daemonset_drains_and_uninstalls(kenv: KubeEnv, foreground: bool) -> None:
    agent = start_agent(kenv)
    soon(lambda: watching(kenv), 10)  # the agent watches its DaemonSet
    t, _ = accelerated_stream(kenv, seconds=5.0)
    started = time.monotonic()
    kenv.api.delete_daemonset(DS, AGENT_NS, foreground=foreground)
    soon(lambda: any("DaemonSet is being deleted" in str(line.get("msg")) for line in agent.log_lines()), 10)
    took = stop_seconds(agent)  # the kubelet's SIGTERM once the pod is deleted
    res = t.assert_intact()  # the live connection was never broken
    assert time.monotonic() - started >= 4.0 and took >= 1.0, "exited before the stream ended"
    assert not kenv.bpffs.exists(), "pins left after the DaemonSet was deleted"
    assert not any(loader.attached_programs(kenv.cgroup.path, kenv.bpffs).values())  # every hook empty
    done = [line for line in agent.log_lines() if line.get("msg") == "uninstalled"]
    assert done and done[0]["drained"] is True and done[0]["sockets_left"] == 0, agent.log_text()
    assert res["requests"] > 10
