"""The measurement loop: which runs, in which order, and what each one records.

Order matters more than anything else on a small shared machine. For every configuration the
repeats are interleaved, ``off, on, off, on, ...`` (``off, loaded, on`` for the not-opted-in
check), so a burst of other work on the machine hits both states rather than one. Before each run
all established connections in the pods are destroyed and the sockhash is checked to be empty; a
warm-up run (new connections, Envoy pools refilled, page cache and branch predictors warm) is
thrown away; then the measured run. Counters (CPU, sockops) are read just before and just after
the measured run, outside the load generator's timing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import load, perfbreak
from bench.profiles import Profile
from bench.topology import MeshLab, PingpongLab, SockopsSwitch, machine_busy_seconds, wait_drained
from lab.cgroups import Cgroup


@dataclass(frozen=True)
class Cell:
    """One measured run."""

    kind: str  # "http", "pingpong", "sockperf", "iperf3"
    mode: str  # benchmark mode, or "pingpong-tcp" / "pingpong-unix" / "sockperf" / "iperf3"
    load: str  # "closed", "rate", "short" (one request per connection), "pingpong" or "stream"
    connections: int
    state: str  # "off", "loaded", "on"
    rep: int

    def label(self) -> str:
        return f"{self.mode} {self.load} c={self.connections} {self.state} #{self.rep + 1}"


def plan(profile: Profile) -> list[Cell]:
    """Every run of the profile, in execution order (grouped by mode so each lab is built once)."""
    cells: list[Cell] = []
    for mode in profile.modes:
        for load_kind, conns in (
            ("closed", profile.connections),
            ("rate", profile.rate_connections),
            ("short", profile.short_connections),
        ):
            for c in conns:
                states: tuple[str, ...] = ("off", "on")
                # Short-lived connections get the not-opted-in check too: every connection of a
                # pod runs the sock_ops program, enabled or not.
                if load_kind in ("closed", "short") and profile.not_opted_in == (mode, c):
                    states = ("off", "loaded", "on")
                for rep in range(profile.repeats):
                    cells += [Cell("http", mode, load_kind, c, s, rep) for s in states]
    if profile.pingpong:
        for rep in range(profile.repeats):
            tcp_states = ("off", "loaded", "on") if profile.not_opted_in else ("off", "on")
            cells += [Cell("pingpong", "pingpong-tcp", "pingpong", 1, s, rep) for s in tcp_states]
            cells.append(Cell("pingpong", "pingpong-unix", "pingpong", 1, "off", rep))
            if profile.sockperf:
                cells += [Cell("sockperf", "sockperf-tcp", "pingpong", 1, s, rep) for s in ("off", "on")]
            if profile.iperf3:
                cells += [Cell("iperf3", "iperf3-tcp", "stream", 1, s, rep) for s in ("off", "on")]
    return cells


def estimate_seconds(profile: Profile, cells: list[Cell]) -> float:
    """Rough wall time, for the progress bar and the --dry-run line."""
    total = 0.0
    for c in cells:
        if c.kind == "http":
            total += max(1, round(profile.warmup_s)) + max(1, round(profile.seconds)) + 0.4
        elif c.kind == "pingpong":
            total += profile.pingpong_warmup + profile.pingpong_seconds + 0.1
        else:
            total += 1 + max(1, round(profile.pingpong_seconds)) + 0.5
    if profile.max_foreign_cpus is not None:
        total += 0.3 * len(cells)
    return total + 2.0 * len(profile.modes) + 3.0


def _per_1k(seconds: float, requests: int) -> float | None:
    return seconds / requests * 1000 if requests else None


def wait_quiet(max_foreign: float, timeout: float, window: float = 0.3) -> float:
    """Wait (at most ``timeout`` s) until the machine is nearly idle while the lab is idle: busy
    CPUs over a short window at most ``max_foreign``. Returns the seconds waited.

    On a machine shared with other work (this project's test suites run in parallel), starting a
    run in the middle of someone else's burst makes its numbers meaningless for both states.
    """
    start = time.monotonic()
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        if (machine_busy_seconds() - before) / window <= max_foreign or time.monotonic() - start > timeout:
            return time.monotonic() - start


@dataclass
class QuietGuard:
    """Shields runs from other work on a shared machine, within a time budget for the whole run.

    Before a run it waits (at most ``quiet_timeout_s``) for the machine to be nearly idle; a run
    that other work disturbed by more than ``max_foreign_cpus`` is repeated (up to ``retries``
    times; the last attempt is kept either way). Waiting and repeating stop once they have cost
    ``budget_s`` seconds in total, so a machine that never quietens down still finishes on time.
    """

    max_foreign_cpus: float | None
    quiet_timeout_s: float
    retries: int
    budget_s: float
    spent_s: float = 0.0

    def run(self, attempt: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        waited = 0.0
        attempts = 0
        limit = self.max_foreign_cpus
        while True:
            attempts += 1
            if limit is not None and self.spent_s < self.budget_s:
                w = wait_quiet(limit, min(self.quiet_timeout_s, self.budget_s - self.spent_s))
                waited += w
                self.spent_s += w
            t0 = time.monotonic()
            result = attempt()
            disturbed = limit is not None and (result.get("foreign_cpus") or 0.0) > limit
            if not disturbed or attempts > self.retries or self.spent_s >= self.budget_s:
                return {**result, "attempts": attempts, "waited_for_quiet_s": waited}
            self.spent_s += time.monotonic() - t0


def _http_attempt(mesh: MeshLab, switch: SockopsSwitch, cell: Cell, profile: Profile) -> dict[str, Any]:
    mesh.reset_connections()
    time_wait_left = mesh.time_wait_sockets()
    switch.set_state(cell.state, mesh.pod_list)
    left = wait_drained(switch)
    mesh.probe_server()
    rate = profile.rate_qps if cell.load == "rate" else 0
    short = cell.load == "short"
    client = mesh.pods["client"]

    def wrk(seconds: float) -> load.HttpLoad:
        return load.HttpLoad(
            mesh.url, cell.connections, seconds, profile.payload, rate, profile.wrk_threads, short
        )

    load.run_wrk(client, wrk(profile.warmup_s))
    tcp0 = load.tcp_counters(client)
    cpu0, cnt0, busy0, t0 = mesh.cpu(), switch.snapshot(), machine_busy_seconds(), time.monotonic()
    result = load.run_wrk(client, wrk(profile.seconds))
    cpu1, cnt1, busy1, wall = mesh.cpu(), switch.snapshot(), machine_busy_seconds(), time.monotonic() - t0
    tcp1 = load.tcp_counters(client)
    # Connections the client pod opened during the measured run: wrk's, plus its Envoy's upstream
    # connections (pooled, so a handful). With short-lived connections, about one per request.
    connects = tcp1["ActiveOpens"] - tcp0["ActiveOpens"]
    cpu = cpu1.seconds_since(cpu0)
    envoys = sum(v for k, v in cpu.items() if k.startswith("envoy_"))
    pods = sum(v for k, v in cpu.items() if k.startswith("pod_") and not k.endswith("_sys"))
    pods_sys = sum(v for k, v in cpu.items() if k.startswith("pod_") and k.endswith("_sys"))
    loadgen = cpu["pod_client"] - cpu.get("envoy_client", 0.0)
    counters = {k: cnt1[k] - cnt0[k] for k in cnt1}
    n = result["requests"]
    return {
        **result,
        "rate_target": rate or None,
        "sockets_left_before": left,
        "time_wait_left_before": time_wait_left,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_envoys_s_per_1k": _per_1k(envoys, n)
        if mesh.pods["client"].envoy or mesh.pods["server"].envoy
        else None,
        "cpu_pods_s_per_1k": _per_1k(pods, n),
        "cpu_loadgen_s_per_1k": _per_1k(loadgen, n),
        "cpu_pods_sys_share": pods_sys / pods if pods else None,
        # CPUs' worth of work by processes outside the benchmark during the measured run.
        "foreign_cpus": max(0.0, (busy1 - busy0) - pods) / wall if wall > 0 else None,
        "loadavg_1m": os.getloadavg()[0],
        "redirected_bytes": counters["redirected_bytes"],
        "redirect_misses": counters["redirect_misses"],
        "sockets_inserted": counters["sockets_inserted"],
        "tcp_connects": connects,
        "tcp_connect_fails": tcp1["AttemptFails"] - tcp0["AttemptFails"],
        "requests_per_connect": n / connects if connects else None,
        "inserted_per_connect": counters["sockets_inserted"] / connects if connects else None,
        "sockops_counters": counters,
    }


def _pingpong_attempt(
    pp: PingpongLab, switch: SockopsSwitch, cell: Cell, profile: Profile, binary: Path
) -> dict[str, Any]:
    assert pp.pod is not None and pp.workdir is not None
    pp.reset_connections()
    switch.set_state(cell.state, [pp.pod])
    left = wait_drained(switch)
    cnt0, own0, busy0, t0 = switch.snapshot(), pp.cpu_usec(), machine_busy_seconds(), time.monotonic()
    if cell.kind == "pingpong":
        family = "unix" if cell.mode == "pingpong-unix" else "tcp"
        address = str(pp.workdir / "pp.sock") if family == "unix" else "127.0.0.1"
        result = load.run_pingpong(
            pp.pod,
            binary,
            family,
            address,
            profile.payload,
            profile.pingpong_warmup,
            profile.pingpong_seconds,
        )
    elif cell.kind == "sockperf":
        result = load.run_sockperf(pp.pod, "127.0.0.1", profile.payload, profile.pingpong_seconds)
    else:
        result = load.run_iperf3(pp.pod, "127.0.0.1", profile.pingpong_seconds)
    cnt1, own1, busy1, wall = switch.snapshot(), pp.cpu_usec(), machine_busy_seconds(), time.monotonic() - t0
    counters = {k: cnt1[k] - cnt0[k] for k in cnt1}
    own = (own1 - own0) / 1e6
    return {
        **result,
        "foreign_cpus": max(0.0, (busy1 - busy0) - own) / wall if wall > 0 else None,
        "sockets_left_before": left,
        "redirected_bytes": counters["redirected_bytes"],
        "redirect_misses": counters["redirect_misses"],
        "sockops_counters": counters,
    }


def _perf_run(mesh: MeshLab, switch: SockopsSwitch, state: str, profile: Profile) -> dict[str, Any]:
    """An extra, unreported-latency run under ``perf record``: where the CPU goes in this state."""
    mesh.reset_connections()
    switch.set_state(state, mesh.pod_list)
    wait_drained(switch)
    client = mesh.pods["client"]
    seconds = max(2, round(profile.seconds))
    load.run_wrk(client, load.HttpLoad(mesh.url, profile.perf_connections, 1, profile.payload))
    proc, data = perfbreak.record(seconds - 1)
    try:
        result = load.run_wrk(
            client, load.HttpLoad(mesh.url, profile.perf_connections, seconds, profile.payload)
        )
        proc.wait(timeout=seconds + 30)
        shares = perfbreak.breakdown(data)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(data.parent, ignore_errors=True)
    return {
        "kind": "perf",
        "mode": mesh.mode,
        "load": "closed",
        "connections": profile.perf_connections,
        "state": state,
        "rep": 0,
        "qps": result["qps"],
        "p50_ms": result["p50_ms"],
        **shares,
    }


@contextlib.contextmanager
def bench_environment() -> Iterator[tuple[Cgroup, SockopsSwitch]]:
    """The benchmark's cgroup and loaded data plane; both removed on the way out, whatever happens."""
    with Cgroup(prefix="sockops-bench-") as root:
        switch = SockopsSwitch(root.path)
        try:
            switch.load()
            yield root, switch
        finally:
            switch.close()


def run(
    profile: Profile,
    progress: Callable[[Cell], None] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Execute the plan; one dict per measured run (the Cell's fields plus the figures).

    Runs are appended to ``results`` as they finish, so a caller that is interrupted keeps them.
    """
    cells = plan(profile)
    results = [] if results is None else results
    guard = QuietGuard(
        profile.max_foreign_cpus, profile.quiet_timeout_s, profile.retries, profile.quiet_budget_s
    )
    with bench_environment() as (root, switch):
        for mode in profile.modes:
            mode_cells = [c for c in cells if c.kind == "http" and c.mode == mode]
            if not mode_cells:
                continue
            with MeshLab(root, mode, profile.payload, profile.envoy_workers, profile.nginx_workers) as mesh:
                for cell in mode_cells:
                    if progress:
                        progress(cell)
                    run = guard.run(lambda c=cell: _http_attempt(mesh, switch, c, profile))
                    results.append({**cell.__dict__, **run})
                if profile.perf and mode == "both" and perfbreak.available():
                    for state in ("off", "on"):
                        results.append(_perf_run(mesh, switch, state, profile))
        pp_cells = [c for c in cells if c.kind != "http"]
        if pp_cells:
            with PingpongLab(root) as pp, tempfile.TemporaryDirectory(prefix="sockops-bench-cc-") as tmp:
                assert pp.workdir is not None
                binary = load.build_pingpong(Path(tmp))
                # The app UID runs it: copy next to the pod's socket directory it owns.
                target = pp.workdir / "pingpong"
                target.write_bytes(binary.read_bytes())
                target.chmod(0o755)
                for cell in pp_cells:
                    if progress:
                        progress(cell)
                    run = guard.run(lambda c=cell: _pingpong_attempt(pp, switch, c, profile, target))
                    results.append({**cell.__dict__, **run})
    return results
