"""The `sockops` command as a user runs it: doctor, agent, enable/disable, status, uninstall."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sockops import loader
from sockops.cgroups import Cgroup
from sockops.podlab import Lab

SOCKOPS = [sys.executable, "-m", "sockops.cli"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def sockops(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SOCKOPS, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command() -> None:
    out = sockops("--help").stdout
    for cmd in ("doctor", "agent", "enable", "disable", "status", "uninstall", "demo"):
        assert cmd in out
    assert "SOCKOPS_BPFFS" in sockops("agent", "--help").stdout


def test_doctor_passes_on_this_machine() -> None:
    res = sockops("doctor", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    names = {p["name"]: p for p in report["probes"]}
    for probe in ("kernel", "cgroup_v2", "bpffs", "kernel_headers", "bcc", "programs_load"):
        assert names[probe]["ok"], names[probe]
    # the load probe cleans up its scratch pins
    assert not list(Path("/sys/fs/bpf").glob("sockops-doctor-*"))


def test_doctor_says_how_to_fix_a_missing_bpffs() -> None:
    """bpffs unmounted in a private mount namespace (the host's mount is untouched)."""
    script = "umount /sys/fs/bpf && exec " + " ".join(SOCKOPS) + " doctor"
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert "bpffs" in res.stdout and "mount -t bpf bpf /sys/fs/bpf" in res.stdout
    assert "can NOT run" in res.stdout


def test_status_without_an_agent_says_what_to_do(tmp_path: Path) -> None:
    res = sockops("status", "--bpffs", "/sys/fs/bpf/sockops-nothing-here")
    assert res.returncode == 2
    assert "start the agent first" in res.stderr


def test_print_program_shows_the_generated_c() -> None:
    res = sockops("agent", "--print-program")
    assert res.returncode == 0
    assert "int sockops_main(struct bpf_sock_ops *skops)" in res.stdout
    assert "int sockops_redirect(struct sk_msg_md *msg)" in res.stdout


def _wait(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_agent_enable_status_restart_uninstall() -> None:
    bpffs = Path("/sys/fs/bpf") / f"sockops-clitest-{uuid.uuid4().hex[:8]}"
    agents: list[subprocess.Popen[str]] = []

    def start_agent() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [
                *SOCKOPS,
                "agent",
                "--source",
                "static",
                "--cgroup",
                str(cg.path),
                "--bpffs",
                str(bpffs),
                "--log-format",
                "json",
                "--resync",
                "1",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        agents.append(p)
        line = p.stderr.readline()
        assert '"attached"' in line, line
        return p

    with Cgroup(prefix="sockops-test-") as cg, Lab(cg) as lab:
        try:
            pod = lab.add_pod("cli", ip="10.244.1.20", sidecar=False)
            agent = start_agent()
            res = sockops("enable", "--netns", pod.netns, "--bpffs", str(bpffs))
            assert res.returncode == 0, res.stderr
            server = pod.popen(
                [sys.executable, "-m", "sockops.apps", "server", "--host", "127.0.0.1"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert "listening" in server.stdout.readline()
            client = pod.run(
                [
                    sys.executable,
                    "-m",
                    "sockops.apps",
                    "client",
                    "--host",
                    "127.0.0.1",
                    "--connections",
                    "4",
                    "--requests",
                    "20",
                    "--sizes",
                    "1,4096,200000",
                ],
                text=True,
                timeout=60,
            )
            assert client.returncode == 0, client.stdout + client.stderr

            status = json.loads(sockops("status", "--json", "--bpffs", str(bpffs)).stdout)
            assert status["redirected_bytes"] > 0
            assert status["redirect_misses"] == 0
            names = [n["name"] for n in status["enabled_netns"]]
            assert pod.netns in names
            for key in ("sockets_active", "redirected_messages", "enabled_netns"):
                assert key in status

            # SIGTERM leaves the programs attached and the maps pinned
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0
            attached = loader.attached_programs(cg.path, bpffs)
            assert [p["name"] for p in attached["sock_ops"]] == ["sockops_main"]
            assert [p["name"] for p in attached["sk_msg"]] == ["sockops_redirec"]
            # a new agent re-adopts the pinned state without attaching twice
            agent = start_agent()
            attached = loader.attached_programs(cg.path, bpffs)
            assert len(attached["sock_ops"]) == 1 and len(attached["sk_msg"]) == 1
            status = json.loads(sockops("status", "--json", "--bpffs", str(bpffs)).stdout)
            assert pod.netns in [n["name"] for n in status["enabled_netns"]]

            res = sockops("disable", "--netns", pod.netns, "--bpffs", str(bpffs))
            assert res.returncode == 0
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
            res = sockops(
                "uninstall", "--cgroup", str(cg.path), "--bpffs", str(bpffs), "--drain-timeout", "5"
            )
            assert res.returncode == 0, res.stderr
            assert not bpffs.exists()
            assert loader.attached_programs(cg.path, bpffs) == {"sock_ops": [], "sk_msg": []}
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
                    a.wait()
            loader.detach_all(cg.path, bpffs)
            loader.unpin(bpffs)
