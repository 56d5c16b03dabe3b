"""Traffic helpers for the kernel tests: start the echo server and run checking clients in a pod.

Every wait is bounded: a hung client or a server that never listens fails the test (with what
the process printed) instead of stalling CI. The processes are plain blocking-socket programs
(lab.apps, tests/support/pinned_client.py), so a spurious EAGAIN reaches them as an error.
"""

from __future__ import annotations

import json
import selectors
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.podlab import APP_UID, Pod

APP_PORT = 8080
HEADER_BYTES = 8  # lab.apps request header, sent client -> server only
PINNED_CLIENT = Path(__file__).resolve().parent / "pinned_client.py"
HALFCLOSE_CLIENT = Path(__file__).resolve().parent / "halfclose_client.py"


def _read_json_line(proc: subprocess.Popen[Any], timeout: float, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            pytest.fail(f"{what}: no output within {timeout}s (pid {proc.pid})")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"{what}: exited with {proc.wait(5)} before printing a line")
    return json.loads(line)


def last_json(stdout: str | None) -> dict[str, Any] | None:
    """A client's summary: the last non-empty line it printed, parsed; None if it printed none."""
    lines = [line for line in (stdout or "").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def run_json(
    pod: Pod, argv: Sequence[str], what: str, uid: int = APP_UID, timeout: float = 60.0, **kw: Any
) -> dict[str, Any]:
    """Run a checking client in the pod; its summary plus ``returncode``/``stderr``. A client that
    runs past ``timeout`` or prints no summary fails the test with what it printed."""
    try:
        res = pod.run(list(argv), uid=uid, timeout=timeout, text=True, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} in pod {pod.name} hung for {timeout}s: {e.stderr!r}")
    out = last_json(res.stdout)
    if out is None:
        pytest.fail(f"{what} in pod {pod.name} printed nothing (rc {res.returncode}): {res.stderr}")
    out["returncode"] = res.returncode
    out["stderr"] = res.stderr
    return out


@dataclass
class EchoServer:
    pod: Pod
    proc: subprocess.Popen[Any]
    log: Path

    def errors(self) -> list[str]:
        """Errors the server printed (one JSON line per failed connection, e.g. an EAGAIN)."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line.strip()]

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_echo_server(
    pod: Pod,
    log_dir: Path,
    host: str = "0.0.0.0",
    port: int = APP_PORT,
    ipv6: bool = False,
    uid: int = APP_UID,
) -> EchoServer:
    """``python -m lab.apps server`` in the pod as ``uid``; returns once it listens and has read a
    probe."""
    argv = [sys.executable, "-m", "lab.apps", "server", "--host", host, "--port", str(port)]
    if ipv6:
        argv.append("--ipv6")
    log = log_dir / f"server-{pod.lab.id}-{pod.name}-{port}.stderr"
    with open(log, "wb") as err:
        proc = pod.popen(argv, uid=uid, stdout=subprocess.PIPE, stderr=err, text=True)
    ready = _read_json_line(proc, 15.0, f"echo server in pod {pod.name}")
    assert ready == {"listening": [host, port]}, ready
    # A readiness probe: the server reads a connection with recv(), so the reader hook knows its
    # port and sockops accelerates what comes next (docs/DATAPLANE.md, "Splice readers"). The probe
    # comes from this process, outside the test cgroup: sock_ops sees only its accepted end.
    pod.probe(port, {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host))
    return EchoServer(pod, proc, log)


def popen_piped(pod: Pod, argv: list[str]) -> subprocess.Popen[str]:
    """A long-running checking program in the pod as the app UID, all three streams piped (the
    caller talks to it on stdin and reads its JSON lines)."""
    return pod.popen(
        argv,
        uid=APP_UID,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_client(
    pod: Pod,
    host: str,
    port: int = APP_PORT,
    connections: int = 4,
    requests: int = 10,
    sizes: Sequence[int] = (1024,),
    uid: int = APP_UID,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``python -m lab.apps client`` in the pod; its JSON line plus ``returncode``/``stderr``.

    Each of the ``connections`` (opened at once) makes ``requests`` requests whose sizes cycle
    through ``sizes``. A client that runs past ``timeout`` is killed and the test fails.
    """
    argv = [
        sys.executable, "-m", "lab.apps", "client",
        "--host", host, "--port", str(port),
        "--connections", str(connections), "--requests", str(requests),
        "--sizes", ",".join(str(s) for s in sizes),
    ]  # fmt: skip
    return run_json(pod, argv, f"client -> {host}:{port}", uid=uid, timeout=timeout)


def run_halfclose_client(
    pod: Pod,
    host: str,
    port: int = APP_PORT,
    connections: int = 8,
    rounds: int = 50,
    sizes: Sequence[int] = (1, 1000),
    timeout: float = 60.0,
) -> dict[str, Any]:
    """tests/support/halfclose_client.py in the pod: ``connections * rounds`` one-request connections that
    half-close after sending. Returns its JSON line (ok, mismatches, errors by type)."""
    argv = [
        sys.executable, str(HALFCLOSE_CLIENT), host, str(port),
        "--connections", str(connections), "--rounds", str(rounds),
        "--sizes", ",".join(str(s) for s in sizes),
    ]  # fmt: skip
    return run_json(pod, argv, "half-close client", timeout=timeout)


def assert_intact(result: dict[str, Any], connections: int, requests: int, sizes: Sequence[int]) -> None:
    """Every request came back byte-for-byte, no connection failed (any EAGAIN is an error here)."""
    assert result["errors"] == [], result["errors"]
    assert result["mismatches"] == 0, result
    assert result["requests"] == connections * requests, result
    assert result["bytes"] == payload_bytes(connections, requests, sizes), result
    assert result["returncode"] == 0, result["stderr"]


def payload_bytes(connections: int, requests: int, sizes: Sequence[int]) -> int:
    """What lab.apps sends: request n of connection i has size sizes[(i + n) % len(sizes)]."""
    return sum(sizes[(i + n) % len(sizes)] for i in range(connections) for n in range(requests))


def wire_bytes(result: dict[str, Any]) -> int:
    """Bytes written by both ends of one hop: requests with headers, plus the echoed payloads."""
    return 2 * result["bytes"] + HEADER_BYTES * result["requests"]


class PinnedClients:
    """tests/support/pinned_client.py running in several pods at once (see its docstring)."""

    def __init__(self, pods: Mapping[str, Pod], host: str, port: int = APP_PORT, **opts: Any) -> None:
        """``pods`` maps a tag (the payload prefix, unique per client) to the pod to run in."""
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.pods = dict(pods)
        flags: list[str] = []
        for key, value in opts.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                flags.append(flag)
            elif value is not False:
                flags += [flag, str(value)]
        for tag, pod in self.pods.items():
            argv = [sys.executable, str(PINNED_CLIENT), host, str(port), "--tag", tag, *flags]
            self.procs[tag] = popen_piped(pod, argv)

    def wait_held(self, timeout: float = 30.0) -> dict[str, list[int]]:
        """With --hold: wait until every client holds its connections open; their local ports."""
        return {
            tag: _read_json_line(p, timeout, f"pinned client {tag}")["held"] for tag, p in self.procs.items()
        }

    def release(self) -> None:
        for p in self.procs.values():
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def results(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Each client's final JSON line (all collected in parallel, bounded by ``timeout``)."""
        out: dict[str, dict[str, Any]] = {}
        failures: list[str] = []

        def collect(tag: str, proc: subprocess.Popen[Any]) -> None:
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"pinned client {tag} hung for {timeout}s")
                return
            res = last_json(stdout)
            if res is None:
                failures.append(f"pinned client {tag} printed nothing (rc {proc.returncode}): {stderr}")
                return
            res["returncode"] = proc.returncode
            res["stderr"] = stderr
            out[tag] = res

        threads = [threading.Thread(target=collect, args=item) for item in self.procs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            pytest.fail("; ".join(failures))
        return out
