"""The agent process across its states: idle nodes, SIGTERM in every state, counted reconciles.

What an operator sees on a fleet: an idle node (kernel or cgroup unsuitable) is Ready and says
why, and leaves nothing behind; a SIGTERM ends the agent in under 2 s whatever it is doing, so a
rolling update of a large DaemonSet is not paced by the agent's resync period.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_PREFIX
from support.agentproc import AgentProcess, agents, sockops, wait_for
from test_agent import Env, plain_pod

from lab.cgroups import Cgroup
from lab.kubeapi import FakeKubeAPI
from lab.podlab import Lab

pytestmark = pytest.mark.kernel

STOP_LIMIT = 2.0  # issue 13: SIGTERM to exit


@pytest.fixture
def lc(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[Env]:
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-lc-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        yield Env(cgroup, bpffs, lab, tmp_path, started)


def stop_seconds(agent: AgentProcess) -> float:
    """SIGTERM, then the seconds until the process has exited (it must exit 0)."""
    t0 = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    try:
        rc = agent.proc.wait(30)
    except subprocess.TimeoutExpired:  # reported by the caller as a 30 s stop
        agent.proc.kill()
        agent.proc.wait()
        return time.monotonic() - t0
    took = time.monotonic() - t0
    assert rc == 0, agent.log_text()
    return took


def logged(agent: AgentProcess, msg: str) -> bool:
    return any(line.get("msg") == msg for line in agent.log_lines())


# -- idle -----------------------------------------------------------------------------------------


def test_idle_agent_is_ready_says_why_and_leaves_nothing_behind(lc: Env, tmp_path: Path) -> None:
    """A --cgroup that is not cgroup v2 (a v1 hierarchy, a typo): idle, Ready, no pins left."""
    not_v2 = tmp_path / "cgroup-v1-like"
    not_v2.mkdir()
    idle = AgentProcess(not_v2, lc.bpffs, tmp_path, ["--source", "static", "--if-unsupported", "idle"])
    lc.started.append(idle)
    idle.wait_ready(60)
    code, body = idle.get("/readyz")
    assert code == 200 and body.startswith("idle: ") and "not a cgroup v2 directory" in body, body
    assert idle.get("/healthz")[0] == 200
    assert idle.metric("sockops_kernel_supported") == 0
    assert idle.metric("sockops_maps_loaded") == 0
    left = sorted(p.name for p in lc.bpffs.iterdir()) if lc.bpffs.exists() else []
    assert left == [], f"an idle agent left pins behind: {left}"
    assert lc.attached() == {}  # attached() leaves out hooks with no program
    assert idle.stop() == 0

    # the same with --if-unsupported exit: exit 2 with the fix, and nothing pinned either
    res = sockops("agent", "--source", "static", "--cgroup", str(not_v2), "--bpffs", str(lc.bpffs),
                  "--metrics-addr", "127.0.0.1:0", "--if-unsupported", "exit")  # fmt: skip
    assert res.returncode == 2 and "cgroup v2" in res.stderr, res.stderr
    assert not lc.bpffs.exists() or not any(lc.bpffs.iterdir())


# -- SIGTERM --------------------------------------------------------------------------------------


def test_sigterm_stops_the_agent_quickly_in_every_state(lc: Env, tmp_path: Path) -> None:
    took: dict[str, float] = {}
    pod = plain_pod(lc)

    # loading: the bcc compile is running (its first log line says so)
    loading = lc.agent("--source", "static", "--netns", pod.netns, "--resync", "30", name="loading")
    wait_for(lambda: loading.log_lines(), 30, "the agent's first log line")
    took["loading"] = stop_seconds(loading)

    # running, the next resync 30 s away
    running = lc.agent("--source", "static", "--netns", pod.netns, "--resync", "30", name="running")
    running.wait_ready()
    time.sleep(0.5)
    took["running"] = stop_seconds(running)

    # resync in progress: the agent resyncs all the time
    busy = lc.agent("--source", "static", "--netns", pod.netns, "--resync", "0.001", name="resync")
    busy.wait_ready()
    took["resync"] = stop_seconds(busy)

    # API server unreachable: requests hang, the first list never comes
    with FakeKubeAPI() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{api.url}'}}}}]\n"
            "users: [{name: fake, user: {}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
            "current-context: fake\n"
        )
        api.pause()
        try:
            cut = lc.agent("--source", "kubernetes", "--node-name", "node-a", "--kubeconfig", str(kubeconfig),
                           "--resync", "30", name="api-down")  # fmt: skip
            wait_for(lambda: logged(cut, "programs attached") and api.requests, 60, "the first list to hang")
            time.sleep(0.5)
            assert cut.get("/readyz")[0] == 503
            took["api unreachable"] = stop_seconds(cut)
        finally:
            api.resume()

    # idle
    not_v2 = tmp_path / "not-v2"
    not_v2.mkdir()
    idle = AgentProcess(not_v2, lc.bpffs, tmp_path, ["--source", "static", "--if-unsupported", "idle"],
                        name="idle")  # fmt: skip
    lc.started.append(idle)
    wait_for(lambda: idle._answers("/healthz", 200), 60, "the idle agent to serve")
    took["idle"] = stop_seconds(idle)

    print("SIGTERM to exit, seconds:", {state: round(s, 2) for state, s in took.items()})
    slow = {state: round(s, 2) for state, s in took.items() if s >= STOP_LIMIT}
    assert not slow, f"SIGTERM took {STOP_LIMIT} s or more: {slow} (all: {took})"


# -- counted reconciles ---------------------------------------------------------------------------


def test_reconciles_are_counted(lc: Env) -> None:
    pod = plain_pod(lc)
    agent = lc.agent("--source", "static", "--netns", pod.netns).wait_ready()  # --resync 1
    first = agent.metric("sockops_reconciles_total", source="static") or 0
    assert first >= 1
    wait_for(
        lambda: (agent.metric("sockops_reconciles_total", source="static") or 0) >= first + 2,
        10,
        "two more resyncs counted",
    )
    assert agent.stop() == 0
