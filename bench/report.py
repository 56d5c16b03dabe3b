"""Turn measured runs into result files: full JSON, summary.json, a Markdown table and PNG plots.

Every figure is reported as a median over repeats with its spread (min-max), and every on/off
comparison as the median of per-repeat ratios with their min-max; targets are evaluated from the
same numbers and stated as measured (met or not), never asserted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import stats
from bench.schema import SHORT_SUFFIX, validate_full, validate_summary

SUMMARY_FILE = "summary.json"
FULL_FILE = "results.json"
MARKDOWN_FILE = "results.md"
PLOTS = ("http_closed.png", "http_rate.png", "http_short.png", "pingpong.png")
HEADLINE = {"mode": "both", "load": "closed", "connections": 16}


# -- reductions --------------------------------------------------------------------------------


def summary_rows(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparable, machine-independent rows of summary.json (closed loop, short-lived
    connections as mode "<mode>-short", and ping-pong)."""
    rows = []
    for g in groups:
        closed = g["kind"] == "http" and g["load"] == "closed"
        short = g["kind"] == "http" and g["load"] == "short"
        pp = g["kind"] == "pingpong"
        if not (closed or short or pp) or g["state"] not in ("off", "on") or "qps" not in g:
            continue
        rows.append(
            {
                "mode": g["mode"] + SHORT_SUFFIX if short else g["mode"],
                "connections": int(g["connections"]),
                "sockops": g["state"],
                "qps_median": round(float(g["qps"]["median"]), 3),
                "p50_ms_median": round(float(g["p50_ms"]["median"]), 6),
                "p99_ms_median": round(float(g["p99_ms"]["median"]), 6),
                "p50_ms_spread": [round(float(g["p50_ms"]["min"]), 6), round(float(g["p50_ms"]["max"]), 6)],
                "runs": int(g["runs"]),
            }
        )
    rows.sort(key=lambda r: (r["mode"], r["connections"], r["sockops"]))
    return rows


def _ratio(ratios: Sequence[dict[str, Any]], metric: str, **match: Any) -> dict[str, Any] | None:
    entry = stats.find(ratios, **match)
    return entry.get(metric) if entry else None


def targets(
    groups: Sequence[dict[str, Any]], ratios_on: Sequence[dict[str, Any]], loaded: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The issue's targets, evaluated on the medians (with the spread of the paired ratios)."""
    out: dict[str, Any] = {}
    h = {"kind": "http", **HEADLINE}
    q, p50, p99 = (_ratio(ratios_on, m, **h) for m in ("qps", "p50_ms", "p99_ms"))
    if q and p50 and p99:
        out["both_16_closed"] = {
            "goal": "p50 and p99 at least 30% lower, QPS at least 30% higher with sockops on",
            "qps_on_off": q,
            "p50_on_off": p50,
            "p99_on_off": p99,
            "met": q["median"] >= 1.3 and p50["median"] <= 0.7 and p99["median"] <= 0.7,
        }
    tcp_on = stats.find(groups, kind="pingpong", mode="pingpong-tcp", state="on")
    unix = stats.find(groups, kind="pingpong", mode="pingpong-unix", state="off")
    tcp_off = stats.find(groups, kind="pingpong", mode="pingpong-tcp", state="off")
    if tcp_on and unix and tcp_off:
        ratio_on = tcp_on["p50_ms"]["median"] / unix["p50_ms"]["median"]
        out["pingpong_vs_unix"] = {
            "goal": "accelerated TCP ping-pong p50 within 1.15x of AF_UNIX",
            "tcp_on_p50_ms": tcp_on["p50_ms"]["median"],
            "tcp_off_p50_ms": tcp_off["p50_ms"]["median"],
            "unix_p50_ms": unix["p50_ms"]["median"],
            "tcp_on_over_unix": ratio_on,
            "tcp_off_over_unix": tcp_off["p50_ms"]["median"] / unix["p50_ms"]["median"],
            "met": ratio_on <= 1.15,
        }
    # Not opted in: the precise figure is the one-connection ping-pong (a p50 of a few µs that
    # repeats to within about 1 %); the HTTP mesh figure is shown too, with its (larger) spread.
    pp = stats.find(loaded, kind="pingpong", mode="pingpong-tcp")
    mesh = next((e for e in loaded if e["kind"] == "http"), None)
    if pp and "p50_ms" in pp:
        out["not_opted_in"] = {
            "goal": "pods not opted in: no slowdown beyond 1% with sockops loaded",
            "pingpong_p50_loaded_off": pp["p50_ms"],
            "pingpong_rate_loaded_off": pp.get("qps"),
            "mesh": {k: mesh[k] for k in ("mode", "load", "connections")} if mesh else None,
            "mesh_qps_loaded_off": mesh.get("qps") if mesh else None,
            "mesh_p50_loaded_off": mesh.get("p50_ms") if mesh else None,
            "met": pp["p50_ms"]["median"] <= 1.01,
        }
    return out


def harness(runs: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The harness's own cost and the run-to-run spread, stated next to the results."""
    http = [r for r in runs if r["kind"] == "http"]
    loadgen = [r["cpu_loadgen_s_per_1k"] for r in http if r.get("cpu_loadgen_s_per_1k")]
    shares = [
        r["cpu_loadgen_s_per_1k"] / r["cpu_pods_s_per_1k"]
        for r in http
        if r.get("cpu_loadgen_s_per_1k") and r.get("cpu_pods_s_per_1k")
    ]
    foreign = [r["foreign_cpus"] for r in runs if r.get("foreign_cpus") is not None]
    spreads = []
    for g in groups:
        if g["kind"] == "http" and "qps" in g and g["runs"] > 1 and g["qps"]["median"]:
            spreads.append((g["qps"]["max"] - g["qps"]["min"]) / g["qps"]["median"])
    spreads_p50 = []
    for g in groups:
        if g["kind"] == "http" and "p50_ms" in g and g["runs"] > 1 and g["p50_ms"]["median"]:
            spreads_p50.append((g["p50_ms"]["max"] - g["p50_ms"]["min"]) / g["p50_ms"]["median"])
    return {
        "loadgen_cpu_s_per_1k": stats.describe(loadgen) if loadgen else None,
        "loadgen_share_of_pods_cpu": stats.describe(shares) if shares else None,
        "qps_relative_spread": stats.describe(spreads) if spreads else None,
        "p50_relative_spread": stats.describe(spreads_p50) if spreads_p50 else None,
        "foreign_cpus": stats.describe(foreign) if foreign else None,
        "repeated_runs": sum(r.get("attempts", 1) - 1 for r in runs),
        "waited_for_quiet_s": sum(r.get("waited_for_quiet_s", 0.0) for r in runs),
        "sockets_left_before_runs": max((r.get("sockets_left_before", 0) for r in runs), default=0),
        "errors": sum(r.get("errors", 0) or 0 for r in runs),
        "waits": sum(r.get("waits", 0) or 0 for r in runs),
    }


def build(runs: list[dict[str, Any]], meta: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    perf = [r for r in runs if r["kind"] == "perf"]
    runs = [r for r in runs if r["kind"] != "perf"]
    groups = stats.group(runs)
    ratios_on = stats.ratios(runs, "on", "off")
    loaded = stats.ratios(runs, "loaded", "off")
    return {
        "meta": meta,
        "profile": profile,
        "runs": runs,
        "groups": groups,
        "ratios": ratios_on,
        "not_opted_in": loaded,
        "targets": targets(groups, ratios_on, loaded),
        "harness": harness(runs, groups),
        "perf": perf,
    }


# -- files --------------------------------------------------------------------------------------


def emit(result: dict[str, Any], out: Path | None) -> None:
    """A control-plane benchmark's result: printed as JSON, and written to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    """Write results.json, summary.json, results.md and the plots; validate the JSON first."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(doc["groups"])
    validate_full(doc)
    validate_summary(rows)
    paths = [out / FULL_FILE, out / SUMMARY_FILE, out / MARKDOWN_FILE]
    paths[0].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    paths[1].write_text(json.dumps(rows, indent=1) + "\n")
    paths[2].write_text(markdown(doc))
    from bench.plots import plot_all

    paths += plot_all(doc, out)
    return paths


def _num(v: float, digits: int) -> str:
    """Plain notation: thousands as integers, smaller values with ``digits`` significant figures."""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    text = f"{v:.{digits}g}"
    if "e" not in text:
        return text
    return f"{v:.0f}" if abs(v) >= 1 else f"{v:.{digits + 3}f}".rstrip("0").rstrip(".")


def _fmt(d: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not d:
        return "-"
    med, lo, hi = d["median"] * scale, d["min"] * scale, d["max"] * scale
    if d.get("n", 1) <= 1:
        return _num(med, digits)
    return f"{_num(med, digits)} ({_num(lo, digits)}-{_num(hi, digits)})"


def _ratio_cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"


HTTP_SECTIONS = (
    ("closed", "Closed loop (wrk, as fast as it goes)"),
    ("rate", "Fixed rate"),
    ("short", "Short-lived connections (closed loop, one request per connection)"),
)


def headline_table(doc: dict[str, Any]) -> str:
    """The closed-loop and short-lived comparison at 16 connections (the README's table)."""
    lines = [
        "| mode | load | connections | sockops | QPS | p50 ms | p99 ms | Envoy CPU s / 1k req |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for g in doc["groups"]:
        if (
            g["kind"] == "http"
            and g["load"] in ("closed", "short")
            and g["connections"] == 16
            and g["state"] != "loaded"
        ):
            lines.append(
                f"| {g['mode']} | {g['load']} | {g['connections']} | {g['state']} | "
                f"{_fmt(g.get('qps'), digits=5)} | "
                f"{_fmt(g.get('p50_ms'))} | {_fmt(g.get('p99_ms'))} | {_fmt(g.get('cpu_envoys_s_per_1k'))} |"
            )
    return "\n".join(lines) + "\n"


def markdown(doc: dict[str, Any]) -> str:
    meta, prof = doc["meta"], doc["profile"]
    lb, la = meta["load_before"], meta["load_after"]
    out = [
        "# sockops benchmark results\n",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['cpu_model']}, {meta['cpus_online']} CPUs; kernel {meta['kernel']}",
        f"- Envoy {meta['envoy_version']}, sockops {meta['sockops_version']} "
        f"({meta['sockops_git_commit'][:12]})",
        f"- profile {prof['name']}: {prof['repeats']} repeats interleaved off/on, "
        f"{prof['warmup_s']} s warm-up "
        f"(discarded) + {prof['seconds']} s measured per run, payload {prof['payload']} B (request and "
        f"response body), Envoy workers {prof['envoy_workers']}, nginx workers {prof['nginx_workers']}, "
        f"wrk threads {prof['wrk_threads']}",
        f"- load average before {lb['loadavg_1m']:.2f}/{lb['loadavg_5m']:.2f}/{lb['loadavg_15m']:.2f}, "
        f"after {la['loadavg_1m']:.2f}/{la['loadavg_5m']:.2f}/{la['loadavg_15m']:.2f} "
        f"(1/5/15 min; anything well above 0 means other work shared the machine)",
        f"- started {meta['started']}, finished {meta['finished']}",
        "",
        "Cells are `median (min-max)` over the repeats; ratios are `median [min-max]` of per-repeat "
        "on/off pairs. CPU is seconds of CPU per 1000 requests: *Envoys* = both sidecars' processes, "
        "*pods* = both pods' cgroups (sidecars, nginx and the wrk load generator).",
        "",
        "## Targets (measured, not asserted)\n",
    ]
    t = doc["targets"]
    if not t:
        out.append("No target applies to this profile.\n")
    if "both_16_closed" in t:
        e = t["both_16_closed"]
        out.append(
            f"- both sidecars, 16 connections, closed loop: QPS on/off {_ratio_cell(e['qps_on_off'])}, "
            f"p50 on/off {_ratio_cell(e['p50_on_off'])}, p99 on/off {_ratio_cell(e['p99_on_off'])} "
            f"(goal ≥1.30 / ≤0.70 / ≤0.70): **{'met' if e['met'] else 'not met'}**"
        )
    if "pingpong_vs_unix" in t:
        e = t["pingpong_vs_unix"]
        out.append(
            f"- TCP ping-pong in one pod vs AF_UNIX (p50): on {e['tcp_on_over_unix']:.2f}x, off "
            f"{e['tcp_off_over_unix']:.2f}x (goal ≤1.15x): **{'met' if e['met'] else 'not met'}**"
        )
    if "not_opted_in" in t:
        e = t["not_opted_in"]
        line = (
            "- pods not opted in, sockops loaded vs off: ping-pong p50 "
            f"{_ratio_cell(e['pingpong_p50_loaded_off'])}, "
            f"round trips/s {_ratio_cell(e['pingpong_rate_loaded_off'])}"
        )
        if e["mesh"]:
            line += (
                f"; mesh ({e['mesh']['mode']}, {e['mesh']['connections']} connections) QPS "
                f"{_ratio_cell(e['mesh_qps_loaded_off'])}, p50 {_ratio_cell(e['mesh_p50_loaded_off'])}"
            )
        out.append(
            line + f" (goal within 1%, judged on the ping-pong p50): **{'met' if e['met'] else 'not met'}**"
        )
    out.append("")
    for load_kind, title in HTTP_SECTIONS:
        gs = [g for g in doc["groups"] if g["kind"] == "http" and g["load"] == load_kind]
        if not gs:
            continue
        if load_kind == "rate":
            title += f" ({prof['rate_qps']} QPS in total)"
        short = load_kind == "short"
        out += [f"## {title}\n"]
        if short:
            out.append(
                "wrk sends `Connection: close` and reconnects after every response. *req/conn* is "
                "requests per TCP connection the client pod opened (its Envoy's pooled upstream "
                "connections included, so slightly under 1 with a sidecar); *inserted/conn* is sockets "
                "sockops put in its sockhash per such connection (both ends of every paired leg). "
                "Latency starts at the request's write: the handshake is in QPS, not in p50/p99.\n"
            )
        extra_head = " req/conn | inserted/conn |" if short else ""
        out += [
            "| mode | conns | sockops | QPS | p50 ms | p90 ms | p99 ms | p99.9 ms | CPU Envoys s/1k | "
            "CPU pods s/1k | kernel % of pods CPU | redirected MB | errors |" + extra_head,
            "|---|---:|---|" + "---:|" * (10 + (2 if short else 0)),
        ]
        gs.sort(
            key=lambda g: (prof["modes"].index(g["mode"]), g["connections"], g["state"] != "off", g["state"])
        )
        for g in gs:
            extra = ""
            if short:
                extra = f" {_fmt(g.get('requests_per_connect'))} | {_fmt(g.get('inserted_per_connect'))} |"
            out.append(
                f"| {g['mode']} | {g['connections']} | {g['state']} | {_fmt(g.get('qps'), digits=5)} | "
                f"{_fmt(g.get('p50_ms'))} | {_fmt(g.get('p90_ms'))} | {_fmt(g.get('p99_ms'))} | "
                f"{_fmt(g.get('p999_ms'))} | {_fmt(g.get('cpu_envoys_s_per_1k'))} | "
                f"{_fmt(g.get('cpu_pods_s_per_1k'))} | {_fmt(g.get('cpu_pods_sys_share'), 100, 2)} | "
                f"{_fmt(g.get('redirected_bytes'), 1e-6, 4)} | "
                f"{int(g['errors']['max']) if 'errors' in g else 0} |" + extra
            )
        out += [
            "",
            "On/off ratios:\n",
            "| mode | conns | QPS | p50 | p99 | p99.9 | CPU Envoys / 1k |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        rs = [r for r in doc["ratios"] if r["kind"] == "http" and r["load"] == load_kind]
        rs.sort(key=lambda r: (prof["modes"].index(r["mode"]), r["connections"]))
        for r in rs:
            out.append(
                f"| {r['mode']} | {r['connections']} | {_ratio_cell(r.get('qps'))} | "
                f"{_ratio_cell(r.get('p50_ms'))} | "
                f"{_ratio_cell(r.get('p99_ms'))} | {_ratio_cell(r.get('p999_ms'))} | "
                f"{_ratio_cell(r.get('cpu_envoys_s_per_1k'))} |"
            )
        out.append("")
    pp = [g for g in doc["groups"] if g["kind"] in ("pingpong", "sockperf", "iperf3")]
    if pp:
        out += [
            "## Inside one pod (no sidecar): ping-pong round trip and stream throughput\n",
            "| test | sockops | round trips/s | p50 us | p99 us | p99.9 us | Gbit/s | redirected MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for g in pp:
            out.append(
                f"| {g['mode']} | {g['state'] if g['mode'] != 'pingpong-unix' else '-'} | "
                f"{_fmt(g.get('qps'), digits=5)} | {_fmt(g.get('p50_ms'), 1000)} | "
                f"{_fmt(g.get('p99_ms'), 1000)} | {_fmt(g.get('p999_ms'), 1000)} | "
                f"{_fmt(g.get('gbit_per_s'))} | "
                f"{_fmt(g.get('redirected_bytes'), 1e-6, 4)} |"
            )
        out.append("")
    out += _perf_section(doc.get("perf") or [])
    h = doc["harness"]
    out += ["## The harness itself\n"]
    if h.get("loadgen_cpu_s_per_1k"):
        out.append(
            f"- load generator (wrk) CPU: {_fmt(h['loadgen_cpu_s_per_1k'])} s per 1000 requests, "
            f"{_fmt(h['loadgen_share_of_pods_cpu'], 100, 2)} % of the pods' CPU; it shares the 2 CPUs "
            "with what it measures, as in any single-node benchmark"
        )
    if h.get("repeated_runs") is not None:
        out.append(
            f"- runs repeated because other work disturbed them: {h['repeated_runs']}; waiting for a quiet "
            f"machine before runs took {h['waited_for_quiet_s']:.0f} s in total"
        )
    if h.get("foreign_cpus"):
        out.append(
            f"- other work on the machine during the measured runs: {_fmt(h['foreign_cpus'], digits=2)} CPUs "
            f"busy outside the benchmark (of {doc['meta']['cpus_online']}; /proc/stat minus the pods' CPU)"
        )
    if h.get("qps_relative_spread"):
        out.append(
            f"- run-to-run spread (max-min)/median over the repeats of one configuration: QPS "
            f"{_fmt(h['qps_relative_spread'], 100, 2)} %, p50 {_fmt(h['p50_relative_spread'], 100, 2)} %"
        )
    out.append(
        f"- errors over all runs: {h['errors']}; ping-pong reads that waited in epoll: {h['waits']}; "
        f"accelerated sockets still in the map before a run: {h['sockets_left_before_runs']}"
    )
    out.append("")
    return "\n".join(out) + "\n"


def _perf_section(perf: Sequence[dict[str, Any]]) -> list[str]:
    """Where the CPU goes (perf record, system-wide), sockops off vs on, as percent of all samples."""
    if not perf:
        return []
    states = [p["state"] for p in perf]
    head = " | ".join(f"sockops {s}" for s in states)
    out = [
        f"## Where the CPU goes (both sidecars, {perf[0]['connections']} connections, perf record -a)\n",
        "Percent of all CPU samples on the machine during one extra run per state (not a measured run); "
        "*other* is everything else that ran on the machine meanwhile.\n",
        f"| where | {head} |",
        "|---|" + "---:|" * len(states),
    ]
    for section in ("by_role", "mesh_kernel_by_group"):
        keys = sorted({k for p in perf for k in p.get(section, {})})
        if section == "mesh_kernel_by_group" and keys:
            out.append(f"| *kernel time of Envoy, nginx and wrk by group:* |{' |' * len(states)}")
        for k in keys:
            out.append(f"| {k} | " + " | ".join(f"{p.get(section, {}).get(k, 0.0):.1f}" for p in perf) + " |")
    out.append("| QPS of the profiled run | " + " | ".join(f"{p['qps']:,.0f}" for p in perf) + " |")
    out.append("")
    return out


def write_partial(runs: list[dict[str, Any]], out: Path) -> Path:
    """On a failure or Ctrl-C: keep what was measured (raw runs only) for inspection."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "partial-runs.json"
    path.write_text(json.dumps(runs, indent=1) + "\n")
    return path
