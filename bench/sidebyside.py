"""Two data planes side by side: ratios from interleaved benchmark invocations of each.

Absolute figures move a lot between machines of one kind and over a session, so a change to the
data plane is judged by the ratios each version reaches against its own "off" runs, measured in
one session with the invocations interleaved (base, new, base, new, ...). Each invocation is
``python -m bench --profile full --modes both --connections 16 --no-rate --no-pingpong
--repeats N --out DIR/<side>-<i>``, run from the checkout of that side. Within one repeat the
off, loaded and on runs follow each other, so the ratios are taken per repeat and summarised
over all of a side's repeats (median, min, max).

Usage: ``python -m bench.sidebyside DIR`` prints the summary and writes DIR/sidebyside.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

STATES = ("off", "loaded", "on")


def _spread(values: list[float]) -> list[float]:
    return [round(statistics.median(values), 3), round(min(values), 3), round(max(values), 3)]


def side_summary(results: list[Path]) -> dict[str, Any]:
    ratios: dict[str, list[float]] = {f"{s}_{m}": [] for s in ("on", "loaded") for m in ("qps", "p50", "p99")}
    qps: dict[str, list[float]] = {s: [] for s in STATES}
    commits = set()
    for path in results:
        doc = json.loads(path.read_text())
        commits.add(doc["meta"].get("sockops_git_commit"))
        runs = [r for r in doc["runs"] if r.get("kind") == "http"]
        for rep in sorted({r["rep"] for r in runs}):
            by = {r["state"]: r for r in runs if r["rep"] == rep}
            if not all(s in by for s in STATES):
                continue
            for s in STATES:
                qps[s].append(by[s]["qps"])
            for s in ("on", "loaded"):
                ratios[f"{s}_qps"].append(by[s]["qps"] / by["off"]["qps"])
                ratios[f"{s}_p50"].append(by[s]["p50_ms"] / by["off"]["p50_ms"])
                ratios[f"{s}_p99"].append(by[s]["p99_ms"] / by["off"]["p99_ms"])
    return {
        "commits": sorted(c for c in commits if c),
        "repeats": len(ratios["on_qps"]),
        "qps_median": {s: round(statistics.median(v), 1) for s, v in qps.items() if v},
        "ratios_median_min_max": {k: _spread(v) for k, v in ratios.items() if v},
    }


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    root = Path(args[0])
    out = {side: side_summary(sorted(root.glob(f"{side}-*/results.json"))) for side in ("base", "new")}
    text = json.dumps(out, indent=2)
    print(text)
    (root / "sidebyside.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
