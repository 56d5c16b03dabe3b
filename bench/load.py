"""Load generators, run inside a pod: wrk (closed loop or fixed rate), ping-pong, sockperf, iperf3.

Each function runs one tool to completion in the given pod (as the app UID, so Istio's iptables
capture it exactly as it would capture the app) and returns its figures as plain dicts. Nothing
here knows about sockops: the caller decides what state the data plane is in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.podlab import APP_UID, Pod

HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_report.lua"
PINGPONG_SOURCE = HERE / "pingpong.c"


class LoadError(RuntimeError):
    """A load generator failed or printed nothing usable."""


@dataclass(frozen=True)
class HttpLoad:
    """One wrk run: ``rate`` 0 means closed loop (as fast as the connections go).

    ``short``: one request per TCP connection. wrk sends ``Connection: close``; the server (nginx,
    or the client's Envoy) answers with it, and wrk closes and reconnects after every response, so
    every request pays a handshake and a close -- and, with sockops on, the pairing path of a new
    connection. wrk's latency starts when the request is written: the handshake shows in QPS, not
    in p50/p99.
    """

    url: str
    connections: int
    seconds: float
    payload: int
    rate: int = 0
    threads: int = 2
    short: bool = False

    def argv(self, script: Path) -> list[str]:
        threads = max(1, min(self.threads, self.connections))
        per_thread = self.rate / threads if self.rate else 0
        close = ["-H", "Connection: close"] if self.short else []
        return [
            "wrk",
            *close,
            "-t",
            str(threads),
            "-c",
            str(self.connections),
            "-d",
            f"{max(1, round(self.seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
            self.url,
            "--",
            str(self.payload),
            f"{per_thread:.3f}",
        ]


def run_wrk(pod: Pod, load: HttpLoad, script: Path = WRK_SCRIPT) -> dict[str, Any]:
    """Run wrk in ``pod`` and return requests, QPS, errors and latency percentiles in ms."""
    res = pod.run(load.argv(script), uid=APP_UID, timeout=load.seconds + 30, text=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if res.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({res.returncode}): {res.stdout[-800:]} {res.stderr[-800:]}")
    raw = json.loads(line.split(" ", 1)[1])
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {
        "requests": raw["requests"],
        "seconds": seconds,
        "qps": raw["requests"] / seconds if seconds > 0 else 0.0,
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "p999_ms": lat["p999"] / 1000,
        "mean_ms": lat["mean"] / 1000,
        "max_ms": lat["max"] / 1000,
    }


def tcp_counters(pod: Pod) -> dict[str, int]:
    """The pod's TCP MIB counters (``/proc/net/snmp`` of its netns: ActiveOpens, PassiveOpens,
    AttemptFails, EstabResets, ...). Their difference around a run counts the connections the
    pod's programs opened, which is how a run with short-lived connections shows that every
    request really had a connection of its own."""
    res = pod.run(["cat", "/proc/net/snmp"], timeout=10, text=True)
    tcp = [ln.split()[1:] for ln in res.stdout.splitlines() if ln.startswith("Tcp:")]
    if res.returncode != 0 or len(tcp) != 2:
        raise LoadError(f"no Tcp lines in /proc/net/snmp of pod {pod.name}: {res.stderr[-400:]}")
    names, values = tcp
    return {k: int(v) for k, v in zip(names, values, strict=True)}


def build_pingpong(workdir: Path) -> Path:
    """Compile bench/pingpong.c into ``workdir`` (readable by the app UID) and return the binary."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise LoadError("no C compiler (cc) found: apt-get install gcc (scripts/setup.sh does)")
    out = workdir / "pingpong"
    res = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(out), str(PINGPONG_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise LoadError(f"compiling {PINGPONG_SOURCE} failed: {res.stderr}")
    out.chmod(0o755)
    return out


def run_pingpong(
    pod: Pod,
    binary: Path,
    family: str,
    address: str,
    payload: int,
    warmup: float,
    seconds: float,
    port: int = 9000,
) -> dict[str, Any]:
    """One ping-pong run (``family`` "tcp" to ``address``:``port``, or "unix" at path ``address``)."""
    argv = [str(binary), family, address]
    if family == "tcp":
        argv.append(str(port))
    argv += [str(payload), str(warmup), str(seconds)]
    res = pod.run(argv, uid=APP_UID, timeout=warmup + seconds + 30, text=True)
    if res.returncode != 0:
        raise LoadError(f"pingpong {family} failed ({res.returncode}): {res.stderr[-800:]}")
    raw = json.loads(res.stdout.strip().splitlines()[-1])
    rtt = raw["rtt_us"]
    return {
        "requests": raw["round_trips"],
        "seconds": raw["seconds"],
        "qps": raw["round_trips"] / raw["seconds"] if raw["seconds"] else 0.0,
        "errors": 0,
        "waits": raw["waits"],  # reads or writes that found nothing and waited in epoll
        "p50_ms": rtt["p50"] / 1000,
        "p90_ms": rtt["p90"] / 1000,
        "p99_ms": rtt["p99"] / 1000,
        "p999_ms": rtt["p999"] / 1000,
    }


_SOCKPERF_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_SOCKPERF_AVG = re.compile(r"avg-(?:rtt|latency)\s*=\s*([\d.]+)")


def wait_listening(pod: Pod, port: int, timeout: float = 10.0) -> None:
    """Wait until something in ``pod`` listens on TCP ``port`` (read from ``ss``, no probe
    connection: a probe would count as a client for servers such as iperf3)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = pod.run(["ss", "-Hltn", f"sport = :{port}"], text=True, timeout=5)
        if res.stdout.strip():
            return
        time.sleep(0.05)
    raise LoadError(f"nothing listens on port {port} in pod {pod.name} after {timeout}s")


def run_sockperf(pod: Pod, address: str, payload: int, seconds: float, port: int = 11111) -> dict[str, Any]:
    """sockperf TCP ping-pong in one pod (a cross-check of pingpong.c with a well-known tool).

    Figures are round-trip times (``--full-rtt``) in ms, comparable with the ping-pong program.
    """
    server = pod.popen(
        ["sockperf", "server", "--tcp", "-i", address, "-p", str(port)],
        uid=APP_UID,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(pod, port)
        pod.probe(port, address, times=1)  # the server has read a connection: sockops accelerates the next
        argv = ["sockperf", "ping-pong", "--tcp", "-i", address, "-p", str(port), "-m", str(payload)]
        argv += ["-t", str(max(1, round(seconds))), "--full-rtt", "--pre-warmup-wait", "1"]
        res = pod.run(argv, uid=APP_UID, timeout=seconds + 30, text=True)
    finally:
        server.kill()
        server.wait(5)
    text = res.stdout + res.stderr
    pcts = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
    if res.returncode != 0 or 50.0 not in pcts:
        raise LoadError(f"sockperf failed ({res.returncode}): {text[-800:]}")
    avg = _SOCKPERF_AVG.search(text)
    return {
        "p50_ms": pcts[50.0] / 1000,
        "p90_ms": pcts.get(90.0, 0.0) / 1000,
        "p99_ms": pcts.get(99.0, 0.0) / 1000,
        "p999_ms": pcts.get(99.9, 0.0) / 1000,
        "avg_ms": float(avg.group(1)) / 1000 if avg else None,
    }


def run_iperf3(pod: Pod, address: str, seconds: float, port: int = 5201) -> dict[str, Any]:
    """iperf3 raw TCP throughput inside one pod, one stream; bits per second received."""
    server = pod.popen(
        ["iperf3", "-s", "-B", address, "-p", str(port)],
        uid=APP_UID,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(pod, port)
        argv = ["iperf3", "-c", address, "-p", str(port), "-t", str(max(1, round(seconds))), "-O", "1", "-J"]
        res = pod.run(argv, uid=APP_UID, timeout=seconds + 30, text=True)
    finally:
        server.kill()
        server.wait(5)
    try:
        data = json.loads(res.stdout)
        received = data["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as e:
        raise LoadError(f"iperf3 failed ({res.returncode}): {res.stdout[-800:]} {res.stderr[-400:]}") from e
    return {"gbit_per_s": received / 1e9, "retransmits": data["end"]["sum_sent"].get("retransmits", 0)}
