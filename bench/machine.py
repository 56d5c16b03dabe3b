"""What the numbers were measured on: kernel, CPU, tool versions, load on the machine, the command.

Recorded in every result file, because a latency figure without the machine it came from (and
without knowing whether something else was running) cannot be compared with anything.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import sockops
from lab.podlab import envoy_binary
from sockops import __version__ as sockops_version
from sockops.loader import bpf_source_dir


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return "not installed"
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (res.stdout + res.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> dict[str, Any]:
    """``uptime``'s figures, so a reader sees whether other work shared the machine."""
    one, five, fifteen = os.getloadavg()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_1m": one,
        "loadavg_5m": five,
        "loadavg_15m": fifteen,
        "uptime": _first_line(["uptime"]),
    }


def git_commit(repo: Path | None = None) -> str:
    """The sockops commit measured: the checkout the ``sockops`` package (and so the data plane's
    bpf/ beside it) was imported from, which need not be the bench's own when a side-by-side run
    puts this bench in front of an older data plane (bench/README.md). SOCKOPS_GIT_COMMIT names it
    when running from an exported tree (``git archive``), which is how a published run avoids
    uncommitted work in a shared checkout."""
    if repo is None and os.environ.get("SOCKOPS_GIT_COMMIT"):
        return os.environ["SOCKOPS_GIT_COMMIT"]
    if repo is None:
        repo = Path(sockops.__file__).resolve().parent.parent
    try:
        res = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return res.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def envoy_version() -> str:
    try:
        line = _first_line([str(envoy_binary()), "--version"])
    except Exception as e:
        return f"unknown ({e})"
    m = re.search(r"version: (\S+)", line)
    return m.group(1) if m else line


def describe(command: str) -> dict[str, Any]:
    """Everything about this machine and this invocation worth keeping next to the numbers."""
    uname = os.uname()
    return {
        "command": command,
        "kernel": f"{uname.sysname} {uname.release} {uname.version}",
        "machine": uname.machine,
        "cpu_model": cpu_model(),
        "cpus_online": os.cpu_count(),
        "memory_kib": _meminfo_total(),
        "envoy_version": envoy_version(),
        "sockops_version": sockops_version,
        "sockops_git_commit": git_commit(),
        "sockops_dir": str(Path(sockops.__file__).resolve().parent),
        "bpf_dir": str(bpf_source_dir().resolve()),
        "bench_git_commit": git_commit(Path(__file__).resolve().parent.parent),
        "wrk": _first_line(["wrk", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "sockperf": _first_line(["sockperf", "--version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "python": platform.python_version(),
    }


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
