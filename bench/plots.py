"""PNG plots of a result document (matplotlib, headless): what a reader looks at first.

* ``http_closed.png``: per mode, QPS and p50/p99 latency against connections, sockops off vs on;
* ``http_rate.png``: the same latencies at the fixed request rate;
* ``http_short.png``: QPS and latencies with one request per connection (short-lived connections);
* ``pingpong.png``: round-trip latency inside one pod, TCP off / TCP on / AF_UNIX.

Markers are medians, bars the min-max over the repeats. A plot whose data the profile did not
measure is still written, with a note, so the set of files is the same for every profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # (after matplotlib.use: the backend must be chosen first)

COLORS = {"off": "tab:gray", "on": "tab:blue", "loaded": "tab:orange"}


def _series(groups: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float], list[list[float]]]:
    groups = sorted(groups, key=lambda g: g["connections"])
    xs = [g["connections"] for g in groups if metric in g]
    meds = [g[metric]["median"] for g in groups if metric in g]
    err = [
        [g[metric]["median"] - g[metric]["min"] for g in groups if metric in g],
        [g[metric]["max"] - g[metric]["median"] for g in groups if metric in g],
    ]
    return xs, meds, err


def _empty(path: Path, note: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, note, ha="center", va="center")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _http(doc: dict[str, Any], load: str, path: Path, with_qps: bool) -> Path:
    groups = [
        g for g in doc["groups"] if g["kind"] == "http" and g["load"] == load and g["state"] in ("off", "on")
    ]
    modes = [m for m in doc["profile"]["modes"] if any(g["mode"] == m for g in groups)]
    if not modes:
        return _empty(path, f"no {load} HTTP runs in this profile")
    rows = [("p50_ms", "p50 latency (ms)"), ("p99_ms", "p99 latency (ms)")]
    if with_qps:
        rows.insert(0, ("qps", "requests / s"))
    fig, axes = plt.subplots(
        len(rows), len(modes), figsize=(3.6 * len(modes), 2.8 * len(rows)), squeeze=False
    )
    for col, mode in enumerate(modes):
        for row, (metric, label) in enumerate(rows):
            ax = axes[row][col]
            for state in ("off", "on"):
                xs, meds, err = _series(
                    [g for g in groups if g["mode"] == mode and g["state"] == state], metric
                )
                if xs:
                    ax.errorbar(
                        xs,
                        meds,
                        yerr=err,
                        marker="o",
                        capsize=3,
                        color=COLORS[state],
                        label=f"sockops {state}",
                    )
            ax.set_xscale("log", base=2)
            ticks = sorted({g["connections"] for g in groups if g["mode"] == mode})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("connections")
            if col == 0:
                ax.set_ylabel(label)
            if row == 0:
                ax.set_title(mode)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    title = {
        "closed": "closed loop",
        "short": "short-lived connections (one request each)",
    }.get(load, f"fixed rate {doc['profile']['rate_qps']} QPS")
    fig.suptitle(f"Envoy sidecar mesh, {title}, payload {doc['profile']['payload']} B (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pingpong(doc: dict[str, Any], path: Path) -> Path:
    bars = []
    for mode, state, label in (
        ("pingpong-tcp", "off", "TCP, sockops off"),
        ("pingpong-tcp", "loaded", "TCP, loaded,\nnot opted in"),
        ("pingpong-tcp", "on", "TCP, sockops on"),
        ("pingpong-unix", "off", "AF_UNIX"),
    ):
        g = next((g for g in doc["groups"] if g["mode"] == mode and g["state"] == state), None)
        if g:
            bars.append((label, g))
    if not bars:
        return _empty(path, "no ping-pong runs in this profile")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for i, (metric, name) in enumerate((("p50_ms", "p50"), ("p99_ms", "p99"))):
        xs = [j + (i - 0.5) * width for j in range(len(bars))]
        meds = [g[metric]["median"] * 1000 for _, g in bars]
        err = [
            [(g[metric]["median"] - g[metric]["min"]) * 1000 for _, g in bars],
            [(g[metric]["max"] - g[metric]["median"]) * 1000 for _, g in bars],
        ]
        ax.bar(xs, meds, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars])
    ax.set_ylabel("round trip (µs)")
    ax.set_title(f"Ping-pong inside one pod, {doc['profile']['payload']} B messages")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(doc: dict[str, Any], out: Path) -> list[Path]:
    return [
        _http(doc, "closed", out / "http_closed.png", with_qps=True),
        _http(doc, "rate", out / "http_rate.png", with_qps=False),
        _http(doc, "short", out / "http_short.png", with_qps=True),
        _pingpong(doc, out / "pingpong.png"),
    ]
