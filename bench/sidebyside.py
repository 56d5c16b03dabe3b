"""Two data planes side by side: ratios from interleaved benchmark invocations of each.

Absolute figures move a lot between machines of one kind and over a session, so a change to the
data plane is judged by the ratios each version reaches against its own "off" runs, measured in
one session with the invocations interleaved (base, new, base, new, ...). Each invocation is
``python -m bench --profile full --modes both --connections 16 --no-rate --no-pingpong
--repeats N --out DIR/<side>-<i>``, run from the checkout of that side. Within one repeat the
off, loaded and on runs follow each other, so the ratios are taken per repeat and summarised
over all of a side's repeats (median, min, max). Only runs of one load are compared: the
closed-loop keep-alive runs by default, ``--load short`` the short-lived connections (one request
per connection, ``python -m bench ... --no-closed``; the summary then also gives requests and
inserted sockets per connection the client pod opened, per state).

Usage: ``python -m bench.sidebyside DIR [--load closed|short] [--mode both|baseline|...]
[--max-foreign-cpus X]`` prints the summary and writes DIR/sidebyside.json (both sidecars, closed
loop), else DIR/sidebyside[-MODE][-LOAD][-quiet].json, e.g. sidebyside-short.json,
sidebyside-baseline-short.json, sidebyside-short-quiet.json (repeats undisturbed by other work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

STATES = ("off", "loaded", "on")
MODES = ("baseline", "both", "client", "server")
LOADS = ("closed", "short")
# Per-run figures of short-lived connections, summarised per state (median, min, max).
PER_CONNECT = ("requests_per_connect", "inserted_per_connect")


def _spread(values: list[float]) -> list[float]:
    return [round(statistics.median(values), 3), round(min(values), 3), round(max(values), 3)]


def side_summary(
    results: list[Path], load: str = "closed", mode: str = "both", max_foreign: float | None = None
) -> dict[str, Any]:
    """One side's ratios over the repeats of ``mode``'s ``load`` runs in every results.json given.

    A repeat needs its off and on runs; the loaded run (programs attached, pod not enabled) is
    used where the profile measured it (only for its not-opted-in configuration). With
    ``max_foreign``, a repeat any of whose runs had more than that many CPUs of other work on the
    machine (``foreign_cpus``, the quiet guard's own measure) is left out and counted: on a shared
    machine the summary over all repeats and the one over the undisturbed ones are both shown.
    """
    ratios: dict[str, list[float]] = {f"{s}_{m}": [] for s in ("on", "loaded") for m in ("qps", "p50", "p99")}
    qps: dict[str, list[float]] = {s: [] for s in STATES}
    per_connect: dict[str, list[float]] = {f"{s}_{k}": [] for s in STATES for k in PER_CONNECT}
    commits = set()
    dropped = 0
    for path in results:
        doc = json.loads(path.read_text())
        runs = [
            r
            for r in doc["runs"]
            if r.get("kind") == "http" and r.get("load", "closed") == load and r.get("mode", "both") == mode
        ]
        if runs:
            commits.add(doc["meta"].get("sockops_git_commit"))
        for rep in sorted({r["rep"] for r in runs}):
            by = {r["state"]: r for r in runs if r["rep"] == rep}
            if "off" not in by or "on" not in by:
                continue
            if max_foreign is not None and any(
                (r.get("foreign_cpus") or 0.0) > max_foreign for r in by.values()
            ):
                dropped += 1
                continue
            for s in (s for s in STATES if s in by):
                qps[s].append(by[s]["qps"])
                for k in PER_CONNECT:
                    if by[s].get(k) is not None:
                        per_connect[f"{s}_{k}"].append(by[s][k])
            for s in (s for s in ("on", "loaded") if s in by):
                ratios[f"{s}_qps"].append(by[s]["qps"] / by["off"]["qps"])
                ratios[f"{s}_p50"].append(by[s]["p50_ms"] / by["off"]["p50_ms"])
                ratios[f"{s}_p99"].append(by[s]["p99_ms"] / by["off"]["p99_ms"])
    out: dict[str, Any] = {
        "commits": sorted(c for c in commits if c),
        "repeats": len(ratios["on_qps"]),
        "qps_median": {s: round(statistics.median(v), 1) for s, v in qps.items() if v},
        "ratios_median_min_max": {k: _spread(v) for k, v in ratios.items() if v},
    }
    if max_foreign is not None:
        out["max_foreign_cpus"] = max_foreign
        out["repeats_dropped_for_other_work"] = dropped
    if load != "closed" or mode != "both":
        out["load"] = load
        out["mode"] = mode
        out["per_connect_median_min_max"] = {k: _spread(v) for k, v in per_connect.items() if v}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sidebyside", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="holds base-<i>/results.json and new-<i>/results.json")
    p.add_argument("--load", choices=LOADS, default="closed", help="which runs to compare (%(default)s)")
    p.add_argument("--mode", choices=MODES, default="both", help="benchmark mode to compare (%(default)s)")
    p.add_argument(
        "--max-foreign-cpus",
        type=float,
        help="leave out repeats with a run during which other work used more CPUs than this (e.g. 0.3)",
    )
    args = p.parse_args(argv)
    root: Path = args.dir
    out = {
        side: side_summary(
            sorted(root.glob(f"{side}-*/results.json")), args.load, args.mode, args.max_foreign_cpus
        )
        for side in ("base", "new")
    }
    if not out["base"]["repeats"] or not out["new"]["repeats"]:
        print(
            f"sidebyside: no repeats with off and on {args.mode} {args.load} runs for both sides under "
            f"{root} (expected base-<i>/results.json and new-<i>/results.json)",
            file=sys.stderr,
        )
        return 2
    text = json.dumps(out, indent=2)
    print(text)
    name = "sidebyside" + "".join(f"-{v}" for v, d in ((args.mode, "both"), (args.load, "closed")) if v != d)
    name += "-quiet.json" if args.max_foreign_cpus is not None else ".json"
    (root / name).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
