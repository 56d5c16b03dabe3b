"""Run tests/support/relpeer.c (the checking client and server of the reliability suite) inside pods.

The C source is compiled once per session into a world-readable temporary directory (the pods'
apps run as UID 1000, and pytest's own tmp directories are private to root). Every wait is
bounded: a client that runs past its timeout is killed and the test fails with what it printed,
so a hang is a failure, never a stuck CI.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab.podlab import Pod
from support.podtraffic import APP_UID, last_json

SOURCE = Path(__file__).resolve().parent / "relpeer.c"


def build_relpeer() -> Iterator[Path]:
    """gcc -O2 -pthread relpeer.c -lcrypto, into a directory UID 1000 can read and execute
    (yields the executable, removes it afterwards; wrap it in a session fixture)."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build tests/support/relpeer.c")
    d = Path(tempfile.mkdtemp(prefix="sockops-relpeer-"))
    try:
        d.chmod(0o755)
        exe = d / "relpeer"
        res = subprocess.run(
            [
                "gcc",
                "-O2",
                "-Wall",
                "-Wno-deprecated-declarations",
                "-pthread",
                "-o",
                str(exe),
                str(SOURCE),
                "-lcrypto",
            ],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.fail(f"building relpeer failed: {res.stderr}")
        exe.chmod(0o755)
        yield exe
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _opts(opts: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


@dataclass
class Server:
    """A relpeer server in a pod; ``stop()`` returns its summary and its per-connection errors."""

    pod: Pod
    proc: subprocess.Popen[str]
    summary: dict[str, Any] = field(default_factory=dict)
    error_lines: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10.0) -> dict[str, Any]:
        if self.summary:
            return self.summary
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"relpeer server in pod {self.pod.name} did not stop within {timeout}s")
        self.summary = last_json(out) or {"ok": 0, "bytes": 0, "errors": {"no_summary": 1}}
        self.error_lines = [line for line in err.splitlines() if line.strip()]
        return self.summary


def start_server(exe: Path, pod: Pod, host: str, port: int, tag: int, **opts: Any) -> Server:
    argv = [str(exe), "server", host, str(port), "--tag", str(tag), *_opts(opts)]
    proc = pod.popen(argv, uid=APP_UID, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(15.0):
            proc.kill()
            pytest.fail(f"relpeer server in pod {pod.name} did not listen within 15s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"relpeer server in pod {pod.name} exited: {proc.wait(5)} {err}")
    assert json.loads(line)["listening"] == [host, port], line
    return Server(pod, proc)


def run_client(
    exe: Path,
    pod: Pod,
    host: str,
    port: int,
    tag: int,
    timeout: float = 120.0,
    hang_ok: bool = False,
    nonblock: bool = True,
    **opts: Any,
) -> dict[str, Any]:
    """relpeer client in the pod as UID 1000; its JSON summary (ok, mismatches, bytes, wall, cpu,
    errors by kind: errno names such as EAGAIN, or what failed). A hang fails the test, unless
    ``hang_ok`` (a case that measures a known hang): then ``{"hung": True}`` comes back.
    ``nonblock``: event-loop clients (O_NONBLOCK, waiting in poll()), which sockops accelerates;
    False for blocking readers, which it leaves on plain TCP."""
    argv = [str(exe), "client", host, str(port), "--tag", str(tag), *_opts({"nonblock": nonblock, **opts})]
    env = {"PATH": "/usr/bin:/bin", **({"RELPEER_VERBOSE": "1"} if os.environ.get("RELPEER_VERBOSE") else {})}
    try:
        res = pod.run(argv, uid=APP_UID, timeout=timeout, text=True, env=env)
    except subprocess.TimeoutExpired as e:
        if hang_ok:
            return {"hung": True}
        pytest.fail(
            f"relpeer client in pod {pod.name} hung for {timeout}s (a hang is a failure): {e.stderr!r}"
        )
    out = last_json(res.stdout)
    if out is None:
        pytest.fail(f"relpeer client in pod {pod.name} printed nothing (rc {res.returncode}): {res.stderr}")
    out["stderr"] = res.stderr
    return out
