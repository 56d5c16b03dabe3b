"""The `sockops` command as a user runs it: doctor, agent, enable/disable, status, uninstall."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # the optional parts: both work here (a tcp iterator; a raw tracepoint, attached for a moment)
    assert names["late_insertion"]["ok"] and not names["late_insertion"]["required"]
    assert names["reader_hook"]["ok"] and not names["reader_hook"]["required"]
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


def test_demo_and_bench_outside_the_checkout_say_what_they_need(tmp_path: Path) -> None:
    """Installed without its checkout (the agent's image), the agent package has no lab or
    bench: the two commands that need them say so, exit 2, no traceback."""
    repo = str(Path(__file__).resolve().parent.parent)
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if p.rstrip('/') != sys.argv[1]]; "
        "from sockops.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    for command in (["bench", "--help"], ["demo"]):
        res = subprocess.run(
            [sys.executable, "-c", code, repo, *command],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 2, res.stdout + res.stderr
        assert f"`sockops {command[0]}` needs the source checkout" in res.stderr
        assert "Traceback" not in res.stderr
