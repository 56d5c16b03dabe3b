"""Run `sockops agent` as a real process for the tests, and talk to it as a user would.

Everything is bounded: readiness, stop and the HTTP calls time out and fail the test with the
agent's log, instead of hanging CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

SOCKOPS = [sys.executable, "-m", "sockops.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sockops(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SOCKOPS, *args], capture_output=True, text=True, timeout=timeout, env=env)


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class AgentProcess:
    """One `sockops agent` process with its own metrics port, state file and log file."""

    def __init__(
        self,
        cgroup: Path,
        bpffs: Path,
        log_dir: Path,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        name: str = "agent",
    ) -> None:
        self.port = free_port()
        self.state_file = log_dir / f"{name}-state.json"
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.argv = [
            *SOCKOPS, "agent",
            "--cgroup", str(cgroup), "--bpffs", str(bpffs),
            "--log-format", "json", "--resync", "1",
            "--metrics-addr", f"127.0.0.1:{self.port}",
            "--state-file", str(self.state_file),
            *args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env={**os.environ, **(env or {})})

    # -- talking to it -----------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def _answers(self, path: str, code: int) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"agent exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.get(path, timeout=1.0)[0] == code
        except OSError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> AgentProcess:
        try:
            wait_for(lambda: self._answers("/readyz", 200), timeout, "agent /readyz 200")
        except BaseException:
            print(self.log_text())
            raise
        return self

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, text = self.get("/metrics")
        assert code == 200, text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    def state(self) -> dict[str, dict[str, object]]:
        """Workloads the agent published, by name."""
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return {w["name"]: w for w in doc["workloads"]}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # -- ending it ---------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"agent did not stop within {timeout}s of SIGTERM:\n{self.log_text()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def agents(cgroup: Path, bpffs: Path) -> Iterator[list[AgentProcess]]:
    """Agents of one test: at the end every one is killed, and what they loaded is detached
    from the test cgroup and unpinned, whatever happened."""
    from sockops import loader

    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for a in started:
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait()
        loader.detach_all(cgroup, bpffs)
        loader.unpin(bpffs)
