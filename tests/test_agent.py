"""The agent as a process, on the real kernel: readiness, status, restart, upgrade, drain.

Every continuity case runs a long-lived accelerated connection (sha256-checked echo requests for
several seconds) across the event and asserts what a user would: every request came back intact,
no error, no hang, and the connection really was accelerated before the event.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PREFIX
from support.agentproc import AgentProcess, agents, sockops, wait_for
from support.podtraffic import APP_PORT, APP_UID, last_json, start_echo_server

from lab.cgroups import Cgroup
from lab.podlab import Lab, Pod
from sockops import layout, loader

pytestmark = pytest.mark.kernel


@dataclass
class Env:
    cgroup: Cgroup
    bpffs: Path
    lab: Lab
    log_dir: Path
    started: list[AgentProcess]

    def agent(self, *args: str, env: dict[str, str] | None = None, name: str = "agent") -> AgentProcess:
        a = AgentProcess(self.cgroup.path, self.bpffs, self.log_dir, args, env=env, name=name)
        self.started.append(a)
        return a

    def maps(self) -> loader.PinnedMaps:
        return loader.PinnedMaps(self.bpffs)

    def netns_stats(self, pod: Pod) -> dict[str, int]:
        from sockops import netns

        with self.maps() as m:
            return m.netns_stats().get(netns.cookie(pod.netns_path), {})

    def attached(self) -> dict[str, list[dict[str, object]]]:
        """Programs on each hook sockops uses (hooks with none left out)."""
        return {k: v for k, v in loader.attached_programs(self.cgroup.path, self.bpffs).items() if v}


@pytest.fixture
def env(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[Env]:
    import secrets

    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-agent-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        yield Env(cgroup, bpffs, lab, tmp_path, started)


def plain_pod(e: Env, name: str = "app") -> Pod:
    pod = e.lab.add_pod(name, ip="10.244.3.10", sidecar=False)
    start_echo_server(pod, e.log_dir, host="127.0.0.1")
    return pod


class Transfer:
    """A long-lived sha256-checked echo stream in a pod (lab.apps client --hold)."""

    def __init__(self, pod: Pod, seconds: float, connections: int = 2, size: int = 65536) -> None:
        pod.probe(APP_PORT)  # the echo server has read a connection: the reader hook knows its port
        argv = [
            sys.executable, "-m", "lab.apps", "client", "--host", "127.0.0.1",
            "--connections", str(connections), "--requests", "1", "--hold", str(seconds),
            "--sizes", f"1,{size},777",
        ]  # fmt: skip
        self.seconds = seconds
        self.proc = pod.popen(argv, uid=APP_UID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("the long transfer hung")
        res = last_json(out)
        assert res is not None, f"client printed nothing (rc {self.proc.returncode}): {err}"
        return res

    def assert_intact(self) -> dict[str, Any]:
        res = self.result()
        assert res["errors"] == [], res
        assert res["mismatches"] == 0, res
        assert res["requests"] > 10, res
        assert self.proc.returncode == 0
        return res


def accelerated_during(e: Env, pod: Pod, before: dict[str, int], timeout: float = 10) -> None:
    wait_for(
        lambda: e.netns_stats(pod).get("redirected_bytes", 0) > before.get("redirected_bytes", 0) + 100_000,
        timeout,
        "redirected bytes to grow",
    )


# -- lifecycle ------------------------------------------------------------------------------------------


def test_static_agent_ready_status_metrics_and_nothing_else_served(env: Env) -> None:
    pod = plain_pod(env)
    agent = env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    wait_for(lambda: agent.state().get(pod.netns, {}).get("state") == "accelerated", 10, "state accelerated")

    t = Transfer(pod, seconds=1.0)
    t.assert_intact()
    assert env.netns_stats(pod)["redirected_bytes"] > 0

    status = json.loads(
        sockops("status", "--json", "--bpffs", str(env.bpffs), "--state-file", str(agent.state_file)).stdout
    )
    (w,) = status["workloads"]
    assert (w["name"], w["state"], w["reason"]) == (pod.netns, "accelerated", "named with --netns")
    assert status["enabled_netns"][0]["name"] == pod.netns

    assert agent.get("/healthz") == (200, "ok\n")
    assert agent.get("/readyz") == (200, "ok\n")
    assert agent.get("/")[0] == 404
    assert agent.get("/debug/pprof")[0] == 404
    assert agent.metric("sockops_program_attached", program="sock_ops") == 1
    assert agent.metric("sockops_pods_accelerated") == 1

    # every log line about a pod names it
    lines = [line for line in agent.log_lines() if line.get("msg") == "accelerated"]
    assert lines and lines[0]["pod"] == pod.netns and "netns" in lines[0] and "cookie" in lines[0]
    assert agent.stop() == 0


def test_unresolvable_namespace_is_pending_with_reason(env: Env) -> None:
    agent = env.agent("--source", "static", "--netns", "sockops-test-nonexistent").wait_ready()
    wait_for(
        lambda: agent.state().get("sockops-test-nonexistent", {}).get("state") == "pending", 10, "pending"
    )
    assert "not found" in agent.state()["sockops-test-nonexistent"]["reason"]
    assert agent.metric("sockops_pods_pending") == 1
    out = sockops("status", "--bpffs", str(env.bpffs), "--state-file", str(agent.state_file)).stdout
    assert "sockops-test-nonexistent" in out and "pending" in out


def test_unsupported_kernel_exits_or_idles(env: Env, tmp_path: Path) -> None:
    """No bpffs where the agent is told to pin: exit 2 with the fix, or idle and say so."""
    not_bpffs = tmp_path / "plain-dir" / "sockops"
    res = sockops("agent", "--source", "static", "--bpffs", str(not_bpffs), "--cgroup", str(env.cgroup.path),
                  "--metrics-addr", "127.0.0.1:0", timeout=60)  # fmt: skip
    assert res.returncode == 2
    assert "mount -t bpf bpf /sys/fs/bpf" in res.stderr

    idle = AgentProcess(
        env.cgroup.path, not_bpffs, tmp_path, ["--source", "static", "--if-unsupported", "idle"]
    )
    env.started.append(idle)
    wait_for(lambda: idle._answers("/healthz", 200), 30, "idle agent healthz")
    code, body = idle.get("/readyz")
    assert code == 200 and body.startswith("idle: ") and "mount -t bpf" in body  # never blocks a rollout
    assert idle.metric("sockops_kernel_supported") == 0
    assert idle.stop() == 0
    assert env.attached() == {}


def test_map_sizes_of_pinned_maps_are_adopted(env: Env) -> None:
    first = env.agent("--source", "static", "--sockhash-size", "1024").wait_ready()
    assert first.stop() == 0
    second = env.agent("--source", "static", "--sockhash-size", "4096").wait_ready()
    assert second.metric("sockops_sockmap_capacity") == 1024
    warned = [line for line in second.log_lines() if "pinned with 1024 entries" in str(line.get("msg"))]
    assert warned, second.log_text()


# -- continuity -----------------------------------------------------------------------------------------


def test_restart_after_kill9_keeps_connections_and_attaches_once(env: Env) -> None:
    pod = plain_pod(env)
    agent = env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    before = env.netns_stats(pod)
    t = Transfer(pod, seconds=5.0)
    accelerated_during(env, pod, before)
    agent.kill9()
    attached = env.attached()
    assert [p["name"] for p in attached["sock_ops"]] == ["sockops_main"]
    mid = env.netns_stats(pod)["redirected_bytes"]
    wait_for(
        lambda: env.netns_stats(pod)["redirected_bytes"] > mid + 100_000, 10, "acceleration without agent"
    )
    env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    t.assert_intact()
    attached = env.attached()
    assert len(attached["sock_ops"]) == 1 and len(attached["sk_msg"]) == 1


def test_disable_midstream_keeps_live_connections_and_stops_new_ones(env: Env) -> None:
    pod = plain_pod(env)
    agent = env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    # Long enough to outlive an agent restart on a loaded 2-CPU machine (bcc compiles for seconds)
    t = Transfer(pod, seconds=8.0)
    accelerated_during(env, pod, env.netns_stats(pod))
    assert agent.stop() == 0
    # the new desired state no longer has the pod: its entry goes, live sockets stay
    env.agent("--source", "static").wait_ready()
    wait_for(lambda: not env.maps().enabled(), 10, "the namespace to be disabled")
    assert t.proc.poll() is None, "the stream ended before the disable: lengthen it"
    mid = env.netns_stats(pod)["redirected_bytes"]
    wait_for(
        lambda: env.netns_stats(pod)["redirected_bytes"] > mid + 100_000,
        10,
        "live connection still accelerated",
    )
    t.assert_intact()
    # counters of a namespace that is off and has no socket left are dropped by the resync, so
    # the node-wide counter tells whether the new connection was inserted
    with env.maps() as m:
        inserted = m.counters()["sockets_inserted"]
    Transfer(pod, seconds=0.5).assert_intact()
    with env.maps() as m:
        assert m.counters()["sockets_inserted"] == inserted, "a new connection was accelerated after disable"


# The counters array has room past the last CNT_* index: its last slot is never used by sockops.
SPARE_COUNTER = layout.CNT_MAX - 1


def _changed_programs(tmp_path: Path) -> Path:
    """A copy of bpf/ whose sk_msg program also counts every message in the spare counter slot."""
    src = loader.bpf_source_dir()
    dst = tmp_path / "bpf-v2"
    shutil.copytree(src, dst)
    text = (dst / "redirect.bpf.c").read_text()
    marker = "int sockops_redirect(struct sk_msg_md *msg)\n{"
    assert marker in text, "sk_msg entry point renamed: update this test"
    (dst / "redirect.bpf.c").write_text(
        text.replace(marker, marker + f"\n\tcount({SPARE_COUNTER}, 1); /* test upgrade */", 1)
    )
    return dst


def _spare_counter(e: Env) -> int:
    import ctypes

    with e.maps() as m:
        per_cpu = m._percpu("counters", ctypes.c_uint32(SPARE_COUNTER), ctypes.c_uint64)
    return sum(v.value for v in per_cpu or [])


def test_upgrade_to_changed_programs_is_atomic(env: Env, tmp_path: Path) -> None:
    pod = plain_pod(env)
    env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    old_tags = {k: [p["tag"] for p in v] for k, v in env.attached().items()}
    t = Transfer(pod, seconds=5.0)
    accelerated_during(env, pod, env.netns_stats(pod))
    v2 = env.agent(
        "--source",
        "static",
        "--netns",
        pod.netns,
        env={"SOCKOPS_BPF_DIR": str(_changed_programs(tmp_path))},
        name="v2",
    )
    v2.wait_ready()
    new = env.attached()
    assert len(new["sock_ops"]) == 1 and len(new["sk_msg"]) == 1
    assert [p["tag"] for p in new["sk_msg"]] != old_tags["sk_msg"], (
        "the changed sk_msg program was not attached"
    )
    # the old stream keeps its program and its peer; new connections run the new program
    t.assert_intact()
    Transfer(pod, seconds=0.5).assert_intact()
    assert _spare_counter(env) > 0


def _uninstall(e: Env, drain_timeout: float) -> subprocess.CompletedProcess[str]:
    res = sockops(
        "uninstall", "--cgroup", str(e.cgroup.path), "--bpffs", str(e.bpffs),
        "--drain-timeout", str(drain_timeout), "--log-format", "json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def _transfer_without_agent(e: Env, seconds: float) -> Transfer:
    """An accelerated long transfer whose agent has stopped (programs and pins stay)."""
    pod = plain_pod(e)
    agent = e.agent("--source", "static", "--netns", pod.netns).wait_ready()
    t = Transfer(pod, seconds=seconds)
    accelerated_during(e, pod, e.netns_stats(pod))
    assert agent.stop() == 0
    return t


def test_uninstall_drains_then_unpins(env: Env) -> None:
    started = time.monotonic()
    t = _transfer_without_agent(env, seconds=6.0)
    res = _uninstall(env, drain_timeout=30)
    assert '"drained": true' in res.stderr, res.stderr
    assert time.monotonic() - started >= 6.0, "uninstall returned before the live connection closed"
    t.assert_intact()
    assert not env.bpffs.exists()
    assert env.attached() == {}


def test_uninstall_reports_drain_timeout_and_loses_nothing(env: Env) -> None:
    # outlives the uninstall's 2 s pause for agents and its 0.5 s drain
    t = _transfer_without_agent(env, seconds=8.0)
    res = _uninstall(env, drain_timeout=0.5)
    assert '"drained": false' in res.stderr and "drain timeout" in res.stderr, res.stderr
    t.assert_intact()
    assert not env.bpffs.exists()


def test_uninstall_while_the_agent_runs_idles_it(env: Env) -> None:
    """The agent must not re-enable what uninstall disables, nor re-create the pins."""
    pod = plain_pod(env)
    agent = env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    t = Transfer(pod, seconds=3.0)
    accelerated_during(env, pod, env.netns_stats(pod))
    res = _uninstall(env, drain_timeout=30)
    assert '"drained": true' in res.stderr, res.stderr
    t.assert_intact()
    code, body = agent.get("/readyz")
    assert code == 200 and body.startswith("idle: uninstalled")
    assert agent.get("/healthz")[0] == 200
    time.sleep(2.5)  # two of the agent's resyncs: nothing comes back
    assert not env.bpffs.exists()
    assert env.attached() == {}
    assert agent.stop() == 0
