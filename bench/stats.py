"""Medians, spreads and on/off ratios over repeated runs.

Runs of one configuration (kind, mode, load, connections, sockops state) are reduced to a median
with min-max and the inter-quartile range. The on/off ratio is taken per repeat, pairing the
``on`` run with the ``off`` run next to it (they ran back to back, so slow drift of the machine
cancels out), and then reduced the same way: its spread is the spread of those paired ratios.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

GROUP_KEYS = ("kind", "mode", "load", "connections", "state")
METRICS = (
    "qps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p999_ms",
    "errors",
    "cpu_envoys_s_per_1k",
    "cpu_pods_s_per_1k",
    "cpu_loadgen_s_per_1k",
    "cpu_pods_sys_share",
    "foreign_cpus",
    "redirected_bytes",
    "redirect_misses",
    "gbit_per_s",
    "waits",
    "tcp_connects",
    "tcp_connect_fails",
    "requests_per_connect",
    "inserted_per_connect",
    "sockets_inserted",
)
RATIO_METRICS = ("qps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "cpu_envoys_s_per_1k", "gbit_per_s")


def describe(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and quartiles of a sample (quartiles equal the median below 4 values)."""
    vals = sorted(values)
    med = statistics.median(vals)
    if len(vals) >= 4:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = med
    return {"median": med, "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3, "n": len(vals)}


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p`` quantile (0..1) of a sample; NaN for none."""
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def latency_summary_ms(values: Sequence[float]) -> dict[str, float]:
    """Count, p50/p90/p99, max and mean of latencies in seconds, in milliseconds."""
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 0.50) * 1e3, 2),
        "p90_ms": round(percentile(values, 0.90) * 1e3, 2),
        "p99_ms": round(percentile(values, 0.99) * 1e3, 2),
        "max_ms": round(max(values) * 1e3, 2) if values else float("nan"),
        "mean_ms": round(statistics.fmean(values) * 1e3, 2) if values else float("nan"),
    }


def _key(run: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(run.get(k) for k in GROUP_KEYS)


def group(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration with a :func:`describe` of every metric the runs have."""
    buckets: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        buckets[_key(run)].append(run)
    out = []
    for key, members in buckets.items():
        entry: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        entry["runs"] = len(members)
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                entry[metric] = describe(values)
        out.append(entry)
    return out


def ratios(runs: Sequence[dict[str, Any]], num: str = "on", den: str = "off") -> list[dict[str, Any]]:
    """Per configuration, the ``num``/``den`` ratio of each metric over paired repeats."""
    by_rep: dict[tuple[Any, ...], dict[int, dict[str, dict[str, Any]]]] = defaultdict(dict)
    for run in runs:
        base = tuple(run.get(k) for k in GROUP_KEYS if k != "state")
        by_rep[base].setdefault(run["rep"], {})[run["state"]] = run
    out = []
    for base, reps in by_rep.items():
        pairs = [(r[num], r[den]) for r in reps.values() if num in r and den in r]
        if not pairs:
            continue
        entry: dict[str, Any] = dict(zip([k for k in GROUP_KEYS if k != "state"], base, strict=True))
        entry["of"] = f"{num}/{den}"
        entry["pairs"] = len(pairs)
        for metric in RATIO_METRICS:
            vals = [a[metric] / b[metric] for a, b in pairs if a.get(metric) and b.get(metric)]
            if vals:
                entry[metric] = describe(vals)
        out.append(entry)
    return out


def find(entries: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first entry whose fields equal ``match``."""
    for e in entries:
        if all(e.get(k) == v for k, v in match.items()):
            return e
    return None
