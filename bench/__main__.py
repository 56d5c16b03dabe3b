"""``python -m bench`` / ``sockops bench``: Envoy sidecar mesh latency and throughput, sockops off vs on.

Builds two Istio-style pods (network namespaces, Istio's iptables, real Envoy sidecars as UID
1337) with nginx in the server pod and wrk in the client pod, loads sockops into a cgroup of its
own, and measures every mode (baseline, both, client, server) x connection count with sockops off
and on, repeats interleaved. Writes results.json, summary.json, results.md and PNG plots to
``--out``. Everything it creates is removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench.profiles import PROFILES, Profile
from bench.runner import Cell, estimate_seconds, plan
from bench.topology import MODES


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def _modes(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in MODES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)} (got {text!r})")
    return values


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "profiles: quick (about 1.2 minutes: baseline and both, 16 connections, 2 repeats,\n"
            "          short-lived connections at 16, ping-pong)\n"
            "          full (about 35 minutes on 2 vCPUs: all modes, 2-64 connections, 5 repeats,\n"
            "          fixed rate at 2/16/64 connections, short-lived connections at 16,\n"
            "          ping-pong, sockperf, iperf3)\n"
            "--dry-run prints the plan and its estimated time.\n"
            "Flags below override the profile's values. Needs root (BPF, namespaces, iptables)."
        ),
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="full", help="default %(default)s")
    p.add_argument(
        "--out", type=Path, default=Path("bench/out"), help="output directory (default %(default)s)"
    )
    p.add_argument("--modes", type=_modes, help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--connections", type=_ints, help="closed-loop connection counts, e.g. 2,4,8,16,32,64")
    p.add_argument("--no-closed", action="store_true", help="skip the closed-loop keep-alive runs")
    p.add_argument("--rate-connections", type=_ints, help="connection counts for the fixed-rate runs")
    p.add_argument("--no-rate", action="store_true", help="skip the fixed-rate runs")
    p.add_argument("--rate", type=int, dest="rate_qps", help="fixed-rate target, requests/s in total (1000)")
    p.add_argument(
        "--short-connections",
        type=_ints,
        help="connection counts for the short-lived runs (one request per connection; 16)",
    )
    p.add_argument("--no-short", action="store_true", help="skip the short-lived-connection runs")
    p.add_argument("--repeats", type=int, help="repeats of every configuration, interleaved off/on")
    p.add_argument("--seconds", type=float, help="measured seconds per run (wrk rounds to whole seconds)")
    p.add_argument("--warmup", type=float, dest="warmup_s", help="discarded warm-up seconds per run")
    p.add_argument("--payload", type=int, help="request and response body bytes (1024)")
    p.add_argument("--envoy-workers", type=int, help="Envoy --concurrency of each sidecar (2)")
    p.add_argument("--nginx-workers", type=int, help="nginx worker processes in the server pod (1)")
    p.add_argument("--no-pingpong", action="store_true", help="skip ping-pong, sockperf and iperf3")
    p.add_argument(
        "--max-foreign-cpus",
        type=float,
        help="shared machine: wait for / repeat runs while other work uses more CPUs than this (0.3)",
    )
    p.add_argument(
        "--no-quiet-guard", action="store_true", help="never wait for a quiet machine or repeat runs"
    )
    p.add_argument(
        "--quiet-budget", type=float, dest="quiet_budget_s", help="seconds the guard may cost (180)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and its estimated time, run nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per run instead)")
    return p


def profile_from(args: argparse.Namespace) -> Profile:
    prof = PROFILES[args.profile].override(
        modes=args.modes,
        connections=args.connections,
        rate_connections=args.rate_connections,
        short_connections=args.short_connections,
        rate_qps=args.rate_qps,
        repeats=args.repeats,
        seconds=args.seconds,
        warmup_s=args.warmup_s,
        payload=args.payload,
        envoy_workers=args.envoy_workers,
        nginx_workers=args.nginx_workers,
        max_foreign_cpus=args.max_foreign_cpus,
        quiet_budget_s=args.quiet_budget_s,
    )
    if args.no_quiet_guard:
        prof = dataclasses.replace(prof, max_foreign_cpus=None)
    if args.no_closed:
        prof = prof.override(connections=())
    if args.no_rate:
        prof = prof.override(rate_connections=())
    if args.no_short:
        prof = prof.override(short_connections=())
    if args.no_pingpong:
        prof = prof.override(pingpong=False)
    if prof.repeats < 1 or prof.seconds <= 0 or prof.payload < 1:
        raise SystemExit("repeats, seconds and payload must be positive")
    return prof


class Progress:
    """tqdm when it is installed and wanted, else one plain line per run."""

    def __init__(self, total: int, seconds: float, enabled: bool) -> None:
        self.bar: Any = None
        self.count = 0
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self.bar = None
        print(f"bench: {total} runs, about {seconds / 60:.1f} min", file=sys.stderr, flush=True)

    def __call__(self, cell: Cell) -> None:
        if self.count:
            self._advance()
        self.count += 1
        if self.bar is not None:
            self.bar.set_description(cell.label())
        else:
            print(f"[{self.count}/{self.total}] {cell.label()}", file=sys.stderr, flush=True)

    def _advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            if self.count:
                self._advance()
            self.bar.close()


def _interrupt_handler(main_pid: int) -> Callable[[int, FrameType | None], None]:
    """SIGTERM and SIGINT clean up like Ctrl-C -- in this process only.

    Helpers forked from it without exec (pyroute2 forks one per netns socket and ends it with
    SIGTERM) inherit the handler, and must die as SIGTERM's default would rather than run this
    process's teardown as their own.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    return handler


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = parser(prog).parse_args(argv)
    prof = profile_from(args)
    cells = plan(prof)
    est = estimate_seconds(prof, cells)
    if args.dry_run:
        for c in cells:
            print(c.label())
        print(f"{len(cells)} runs, about {est / 60:.1f} min")
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (BPF programs, network namespaces, iptables)", file=sys.stderr)
        return 2

    from bench import machine, report, runner

    command = " ".join([prog, *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    meta = machine.describe(command)
    meta["load_before"] = machine.load_average()
    meta["started"] = meta["load_before"]["time"]
    handler = _interrupt_handler(os.getpid())
    old_term = signal.signal(signal.SIGTERM, handler)
    # Installed explicitly for SIGINT too: a shell starts background jobs with SIGINT ignored, and
    # Python keeps it ignored; the harness promises that an interrupt cleans up wherever it started.
    old_int = signal.signal(signal.SIGINT, handler)
    progress = Progress(len(cells), est, enabled=not args.no_progress)
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        runs = runner.run(prof, progress=progress, results=runs)
    except KeyboardInterrupt:
        progress.close()
        kept = report.write_partial(runs, args.out) if runs else None
        where = f", runs so far in {kept}" if kept else ""
        print(f"\nbench: interrupted; everything it made is removed{where}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    progress.close()
    meta["load_after"] = machine.load_average()
    meta["finished"] = meta["load_after"]["time"]
    meta["wall_s"] = time.monotonic() - t0
    doc = report.build(runs, meta, prof.to_dict())
    paths = report.write_all(doc, args.out)
    print(report.headline_table(doc))
    for name, t in doc["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'not met'}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
