"""Checks for the two result files, so a consumer (and the test suite) can trust their shape.

Written as explicit checks rather than a JSON Schema document: the rules are few, and an explicit
check can say exactly which row and field is wrong.
"""

from __future__ import annotations

import math
from typing import Any

# Closed-loop rows carry the benchmark mode; short-lived-connection rows "<mode>-short" (one
# request per connection), so a summary row keeps one shape whatever load produced it.
HTTP_MODES = ("baseline", "both", "client", "server")
SHORT_SUFFIX = "-short"
SUMMARY_MODES = (*HTTP_MODES, *(m + SHORT_SUFFIX for m in HTTP_MODES), "pingpong-tcp", "pingpong-unix")
HTTP_LOADS = ("closed", "rate", "short")
# What a short-lived-connection run must record besides the figures of every HTTP run: the
# connections the client pod opened, which is what shows one request per connection.
SHORT_RUN_KEYS = ("tcp_connects", "tcp_connect_fails", "requests_per_connect", "sockets_inserted", "errors")
SUMMARY_FIELDS = {
    "mode": str,
    "connections": int,
    "sockops": str,
    "qps_median": (int, float),
    "p50_ms_median": (int, float),
    "p99_ms_median": (int, float),
    "p50_ms_spread": list,
    "runs": int,
}
FULL_KEYS = ("meta", "profile", "runs", "groups", "ratios", "targets", "harness")
META_KEYS = (
    "command",
    "kernel",
    "cpu_model",
    "envoy_version",
    "sockops_version",
    "load_before",
    "load_after",
    "started",
    "finished",
)


class SchemaError(ValueError):
    """A result file does not have the documented shape."""


def _number(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{where}: expected a finite number, got {value!r}")


def validate_summary(rows: Any) -> None:
    """summary.json: a list of rows ``{"mode", "connections", "sockops", "qps_median",
    "p50_ms_median", "p99_ms_median", "p50_ms_spread": [lo, hi], "runs"}``."""
    if not isinstance(rows, list) or not rows:
        raise SchemaError("summary: expected a non-empty list of rows")
    seen = set()
    for i, row in enumerate(rows):
        where = f"summary[{i}]"
        if not isinstance(row, dict) or set(row) != set(SUMMARY_FIELDS):
            raise SchemaError(f"{where}: expected exactly the fields {sorted(SUMMARY_FIELDS)}, got {row!r}")
        for name, kind in SUMMARY_FIELDS.items():
            if isinstance(row[name], bool) or not isinstance(row[name], kind):
                raise SchemaError(f"{where}.{name}: wrong type {type(row[name]).__name__}")
        if row["mode"] not in SUMMARY_MODES:
            raise SchemaError(f"{where}.mode: {row['mode']!r} not one of {SUMMARY_MODES}")
        if row["sockops"] not in ("off", "on"):
            raise SchemaError(f"{where}.sockops: {row['sockops']!r} is not 'off' or 'on'")
        if row["connections"] < 1 or row["runs"] < 1:
            raise SchemaError(f"{where}: connections and runs must be >= 1")
        for name in ("qps_median", "p50_ms_median", "p99_ms_median"):
            _number(row[name], f"{where}.{name}")
            if row[name] < 0:
                raise SchemaError(f"{where}.{name}: negative")
        lo_hi = row["p50_ms_spread"]
        if len(lo_hi) != 2:
            raise SchemaError(f"{where}.p50_ms_spread: expected [lo, hi]")
        for v in lo_hi:
            _number(v, f"{where}.p50_ms_spread")
        if not lo_hi[0] <= row["p50_ms_median"] <= lo_hi[1]:
            raise SchemaError(f"{where}: median p50 outside its spread {lo_hi}")
        key = (row["mode"], row["connections"], row["sockops"])
        if key in seen:
            raise SchemaError(f"{where}: duplicate row for {key}")
        seen.add(key)


def validate_full(doc: Any) -> None:
    """The full results JSON: meta (machine, versions, command, load), profile, runs and reductions."""
    if not isinstance(doc, dict):
        raise SchemaError("results: expected an object")
    missing = [k for k in FULL_KEYS if k not in doc]
    if missing:
        raise SchemaError(f"results: missing {missing}")
    meta = doc["meta"]
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise SchemaError(f"results.meta: missing {missing}")
    if not isinstance(doc["runs"], list) or not doc["runs"]:
        raise SchemaError("results.runs: expected a non-empty list")
    for i, run in enumerate(doc["runs"]):
        for key in ("kind", "mode", "load", "connections", "state", "rep"):
            if key not in run:
                raise SchemaError(f"results.runs[{i}]: missing {key}")
        if run["kind"] in ("http", "pingpong"):
            for key in ("qps", "p50_ms", "p99_ms"):
                _number(run.get(key), f"results.runs[{i}].{key}")
        if run["kind"] == "http" and run["load"] not in HTTP_LOADS:
            raise SchemaError(f"results.runs[{i}].load: {run['load']!r} not one of {HTTP_LOADS}")
        if run["kind"] == "http" and run["load"] == "short":
            for key in SHORT_RUN_KEYS:
                _number(run.get(key), f"results.runs[{i}].{key}")
    for i, group in enumerate(doc["groups"]):
        if "runs" not in group or "state" not in group:
            raise SchemaError(f"results.groups[{i}]: missing runs/state")
