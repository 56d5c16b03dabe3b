"""Observe mode (``sockops.io/accelerate: "observe"``): report what a pod's programs would get,
never enable the pod.

* the annotation and label parsing (no root needed);
* the /proc scanner against real programs of known socket styles in a lab pod
  (tests/support/observe_peer.py), checked by content per program;
* the agent end to end with the fake Kubernetes API server: ``observing`` with the report in
  /status, the state file, ``sockops status`` and /metrics, the namespace never enabled, and the
  annotation flipped to "true" and back without breaking live connections.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PREFIX
from support.agentproc import AgentProcess, agents, sockops, wait_for
from support.podtraffic import popen_piped
from test_agent import Transfer
from test_agent_kubernetes import ON, KubeEnv, cookie

from lab.cgroups import Cgroup
from lab.kubeapi import FakeKubeAPI
from lab.podlab import Lab, Pod
from sockops import kubectl_plugin, loader, observe
from sockops.sources.objects import container_to_workload, pod_to_workload
from sockops.workload import ANNOTATION, OBSERVE, decide, decide_container

PEER = Path(__file__).resolve().parent / "support" / "observe_peer.py"
OBSERVE_ON = {ANNOTATION: "observe"}
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# -- parsing --------------------------------------------------------------------------------------


def test_observe_is_a_valid_pod_annotation_and_docker_label() -> None:
    d = decide({ANNOTATION: " Observe "}, {"sockops.io/accelerate": "enabled"})
    assert (d.accelerate, d.observe, d.mode, d.error) == (False, True, OBSERVE, None)
    assert d.reason == "pod annotation sockops.io/accelerate=observe"
    assert decide({ANNOTATION: "true"}, None).mode == "accelerate"
    assert decide({ANNOTATION: "false"}, None).mode == "off"

    c = decide_container({"sockops.io/accelerate": "observe"})
    assert (c.accelerate, c.observe) == (False, True)
    assert c.reason == "container label sockops.io/accelerate=observe"

    # the workload carries it; a host-network pod is never observed (its sockets are the node's)
    pod = {"metadata": {"uid": "u1", "namespace": "shop", "name": "cart", "annotations": OBSERVE_ON}}
    w = pod_to_workload(pod, None)
    assert w is not None and w.observe and not w.accelerate and w.mode == OBSERVE
    hostnet = {**pod, "spec": {"hostNetwork": True}}
    w = pod_to_workload(hostnet, None)
    assert w is not None and not w.observe and not w.accelerate and w.reason == "host network"
    info = {
        "Id": "c" * 64,
        "Name": "/web",
        "State": {"Running": True, "Pid": 4242},
        "Config": {"Labels": {"sockops.io/accelerate": "observe"}},
        "HostConfig": {"NetworkMode": "host"},
    }
    w = container_to_workload(info)
    assert w is not None and not w.observe and "host" in w.reason
    w = container_to_workload({**info, "HostConfig": {"NetworkMode": "bridge"}})
    assert w is not None and w.observe and not w.accelerate


def test_an_invalid_value_names_every_valid_one() -> None:
    d = decide({ANNOTATION: "maybe"}, None)
    assert not d.accelerate and not d.observe and d.reason == "invalid pod annotation"
    assert d.error == (
        'sockops.io/accelerate="maybe" is not valid: write "true" or "false", '
        'or "observe" to report without accelerating'
    )
    c = decide_container({"sockops.io/accelerate": "yes"})
    assert c.reason == "invalid container label" and c.error is not None
    assert c.error.startswith('label sockops.io/accelerate="yes" is not valid')
    assert all(f'"{v}"' in c.error for v in ("true", "false", "observe"))
    # the namespace label's values are unchanged: observing is decided per workload
    n = decide(None, {"sockops.io/accelerate": "observe"})
    assert n.reason == "invalid namespace label" and not n.observe
    assert n.error is not None and n.error.endswith('write "enabled" or "disabled"')


def test_tcp_tables_are_parsed_with_ipv4_mapped_addresses() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000 0 111 1\n"
        "   1: 0100007F:C350 0100007F:2328 01 00000000:00000000 00:00000000 00000000  1000 0 222 1\n"
        "   2: 0000000000000000FFFF00000100007F:2328 0000000000000000FFFF00000100007F:C350 01 "
        "00000000:00000000 00:00000000 00000000 1000 0 333 1\n"
        "   3: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D431 01 "
        "00000000:00000000 00:00000000 00000000 0 0 444 1\n"
        "garbage\n"
    )
    rows = {e.inode: e for e in observe.parse_tcp_table(text)}
    assert rows[111].state == observe.TCP_LISTEN and rows[111].local == ("127.0.0.1", 9000)
    assert rows[222].local == ("127.0.0.1", 50000) and rows[222].remote == ("127.0.0.1", 9000)
    assert rows[333].local == ("127.0.0.1", 9000) and rows[333].remote == ("127.0.0.1", 50000)
    assert rows[444].local == ("::1", 8080)
    assert set(rows) == {111, 222, 333, 444}


def test_scan_never_raises(tmp_path: Path) -> None:
    """Fail open: a namespace that is gone, a /proc that cannot be listed, a scanner bug."""
    reports = observe.scan({"gone": tmp_path / "no-such-netns"})
    assert reports["gone"].error and "cannot read the network namespace" in reports["gone"].error
    reports = observe.scan({"x": Path("/proc/self/ns/net")}, proc=tmp_path / "no-proc")
    assert reports["x"].error and reports["x"].error.startswith("cannot list processes")
    assert observe.render(reports["x"].to_json())[0].endswith(reports["x"].error)
    assert observe.render(None) == ["observed: not scanned yet"]


# -- the scanner on real programs -----------------------------------------------------------------


class Peers:
    """observe_peer.py processes in a pod; stdin closed at the end (they exit), bounded waits."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        argv = [sys.executable, str(PEER), *args, "--name", name, "--hold", "120"]
        proc = popen_piped(self.pod, argv)
        self.procs[name] = proc
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(15.0):
                pytest.fail(f"{name} printed nothing within 15 s")
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"{name} exited with {proc.wait(5)}: {proc.stderr.read() if proc.stderr else ''}")
        json.loads(line)
        return proc

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def peers(lab: Lab) -> Iterator[Peers]:
    p = Peers(lab.add_pod("watched", ip="10.244.6.10", sidecar=False))
    try:
        yield p
    finally:
        p.close()


def by_program(report: observe.Report) -> dict[str, dict[tuple[str, str, str], int]]:
    return {p.name: {(g.role, g.style, g.verdict): g.sockets for g in p.groups} for p in report.programs}


EXPECTED = {
    # thread-per-connection server: its blocking server ends are accelerated but exposed, except
    # those of blocking clients, whose connections never leave TCP
    "obs-server": {
        ("accepted", "blocking", observe.PLAIN_TCP): 2,
        ("accepted", "blocking", observe.EXPOSED): 3,
    },
    "obs-evserver": {("accepted", "nonblocking", observe.ACCELERATED): 2},
    "obs-blocking": {("connected", "blocking", observe.PLAIN_TCP): 2},
    "obs-timeout": {("connected", "nonblocking", observe.ACCELERATED): 3},
    "obs-asyncio": {("connected", "nonblocking", observe.ACCELERATED): 2},
}


def start_peers(peers: Peers) -> None:
    peers.start("obs-server", "server", "--port", "9000")
    peers.start("obs-evserver", "evserver", "--port", "9001")
    peers.start("obs-blocking", "client", "--port", "9000", "--style", "blocking", "--connections", "2")
    peers.start("obs-timeout", "client", "--port", "9000", "--style", "timeout", "--connections", "3")
    peers.start("obs-asyncio", "client", "--port", "9001", "--style", "asyncio", "--connections", "2")


@root_only
@pytest.mark.timeout(90)
def test_scan_reports_each_programs_roles_styles_and_verdicts(peers: Peers) -> None:
    start_peers(peers)
    netns = peers.pod.netns_path
    seen: dict[str, Any] = {}

    def complete() -> bool:
        seen["report"] = observe.scan({"pod": netns})["pod"]
        return by_program(seen["report"]) == EXPECTED

    # a client's handshake completes before the server has accepted: wait for the fds
    try:
        wait_for(complete, 10, "every connection in the report")
    except BaseException:
        print(json.dumps(seen["report"].to_json(), indent=1))
        raise
    report: observe.Report = seen["report"]
    assert report.error is None and report.capped == ()
    assert report.processes == 5 and report.sockets == 14  # the two listeners are not counted
    programs = {p.name: p for p in report.programs}
    for name, proc in peers.procs.items():
        assert programs[name].pids == (proc.pid,)
        assert programs[name].exe == os.path.basename(os.path.realpath(sys.executable))
    groups = {(g.role, g.style, g.verdict): g for p in report.programs for g in p.groups}
    assert "blocking client is never given a psock" in groups[("connected", "blocking", "plain_tcp")].reason
    assert "KERNEL-NOTES.md §1" in groups[("accepted", "blocking", "accelerated_exposed")].reason
    assert "its client (in this pod) is blocking" in groups[("accepted", "blocking", "plain_tcp")].reason
    assert any("splice()" in c and "§3" in c for c in report.caveats)
    assert report.totals() == {
        ("accepted", "blocking", "plain_tcp"): 2,
        ("accepted", "blocking", "accelerated_exposed"): 3,
        ("accepted", "nonblocking", "accelerated"): 2,
        ("connected", "blocking", "plain_tcp"): 2,
        ("connected", "nonblocking", "accelerated"): 5,
    }
    text = "\n".join(observe.render(report.to_json()))
    assert "obs-server (python" in text and "3 accepted blocking: accelerated but exposed (" in text
    assert "2 connected blocking: plain TCP (" in text
    assert "note: splice() readers" in text

    # bounded: caps are said, a process that is gone is skipped without a word
    capped = observe.scan({"pod": netns}, max_processes=2)["pod"]
    assert capped.processes == 2 and capped.capped == ("processes: only the first 2 scanned",)
    capped = observe.scan({"pod": netns}, max_sockets=4)["pod"]
    assert capped.sockets == 4 and capped.capped == ("sockets: stopped at 4",)
    dead = subprocess.Popen(["true"])
    dead.wait()
    again = observe.scan_pids([dead.pid, *(p.pid for p in peers.procs.values())])
    assert again.error is None and by_program(again) == EXPECTED


# -- the agent, end to end ------------------------------------------------------------------------


@pytest.fixture
def kube(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[KubeEnv]:
    api = FakeKubeAPI().start()
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-obs-{secrets.token_hex(4)}"
    try:
        with agents(cgroup.path, bpffs) as started:
            yield KubeEnv(api, cgroup, lab, bpffs, tmp_path, started)
    finally:
        api.close()


def observed_groups(workload: dict[str, Any]) -> dict[str, dict[tuple[str, str, str], int]]:
    report = workload.get("observed") or {}
    return {
        p["program"]: {(g["role"], g["style"], g["verdict"]): g["sockets"] for g in p["groups"]}
        for p in report.get("programs") or []
    }


@pytest.mark.kernel
@pytest.mark.timeout(180)
def test_agent_observes_without_enabling_then_flips(kube: KubeEnv) -> None:
    kube.api.add_namespace("default")
    uid, pod = kube.pod("watched", "default", OBSERVE_ON)  # blocking echo server on 127.0.0.1:8080
    peers = Peers(pod)
    try:
        peers.start("obs-timeout", "client", "--port", "8080", "--style", "timeout", "--connections", "2")
        peers.start("obs-blocking", "client", "--port", "8080", "--style", "blocking")
        agent = kube.agent().wait_ready()
        _observing_everywhere(kube, agent, pod)
    finally:
        peers.close()

    # observe -> true: enabled, and a live stream is accelerated
    kube.api.update_pod(uid, annotations=ON)
    wait_for(lambda: cookie(pod) in kube.enabled(), 10, "annotation true enables the pod")
    wait_for(lambda: agent.state()["watched"]["state"] == "accelerated", 10, "state accelerated")
    assert agent.state()["watched"]["observed"] is None
    t = Transfer(pod, seconds=8.0)
    wait_for(lambda: redirected(kube, pod) > 100_000, 15, "the stream to be accelerated")

    # true -> observe: disabled for new connections; the live one keeps its peer and every byte
    kube.api.update_pod(uid, annotations=OBSERVE_ON)
    wait_for(lambda: cookie(pod) not in kube.enabled(), 10, "observe disables the pod")
    wait_for(lambda: agent.state()["watched"]["state"] == "observing", 10, "observing again")
    assert t.proc.poll() is None, "the stream ended before the flip: lengthen it"
    mid = redirected(kube, pod)
    wait_for(lambda: redirected(kube, pod) > mid + 100_000, 10, "live connection still accelerated")
    t.assert_intact()


def redirected(kube: KubeEnv, pod: Pod) -> int:
    with loader.PinnedMaps(kube.bpffs) as m:
        return m.netns_stats().get(cookie(pod), {}).get("redirected_bytes", 0)


def _observing_everywhere(kube: KubeEnv, agent: AgentProcess, pod: Pod) -> None:
    """The observed pod's report in the state file, /status, `sockops status` and /metrics."""
    want = {
        "obs-timeout": {("connected", "nonblocking", "accelerated"): 2},
        "obs-blocking": {("connected", "blocking", "plain_tcp"): 1},
        # lab.apps' thread-per-connection echo server: one blocking server end per client
        "python": {
            ("accepted", "blocking", "accelerated_exposed"): 2,
            ("accepted", "blocking", "plain_tcp"): 1,
        },
    }
    wait_for(
        lambda: observed_groups(agent.state().get("watched", {})) == want, 15, "the report in the state file"
    )
    st = agent.state()["watched"]
    assert st["state"] == "observing" and st["reason"] == "pod annotation sockops.io/accelerate=observe"
    assert st["cookie"] == cookie(pod) and st["observed"]["error"] is None
    assert cookie(pod) not in kube.enabled(), "an observed pod was enabled"

    code, body = agent.get("/status")
    assert code == 200
    (mine,) = [w for w in json.loads(body)["workloads"] if w["name"] == "watched"]
    assert mine["state"] == "observing" and observed_groups(mine) == want

    res = sockops(
        "status", "--bpffs", str(kube.bpffs), "--state-file", str(agent.state_file),
        "--cgroup", str(kube.cgroup.path),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "default/watched" in res.stdout and "observing" in res.stdout
    assert "obs-timeout (python" in res.stdout
    assert "2 connected nonblocking: accelerated (" in res.stdout
    assert "2 accepted blocking: accelerated but exposed (" in res.stdout
    assert "1 connected blocking: plain TCP (" in res.stdout
    assert "note: splice() readers" in res.stdout
    found = {"pod": "default/watched", "node": "node-a", "agent": "sockops-system/a", "agent_state": "ok",
             "workload": mine}  # fmt: skip
    plugin = kubectl_plugin.render(found)
    assert plugin.splitlines()[0] == "default/watched: observing"
    assert "    2 accepted blocking: accelerated but exposed (" in plugin

    labels = {"namespace": "default", "pod": "watched"}
    assert agent.metric("sockops_observed_sockets", **labels, role="connected", style="nonblocking",
                        verdict="accelerated") == 2  # fmt: skip
    assert agent.metric("sockops_observed_sockets", **labels, role="accepted", style="blocking",
                        verdict="accelerated_exposed") == 2  # fmt: skip
    assert agent.metric("sockops_workloads", state="observing") == 1
    assert agent.metric("sockops_pods_accelerated") == 0
