"""The benchmark harness end to end: the quick profile on the real kernel with real Envoy sidecars.

Checks what the harness promises, not how fast anything is (performance is measured, never
asserted): both sockops states produce numbers, "on" really redirects bytes, the result files
have their documented shape, the plots exist, and nothing with the bench prefix is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, schema, stats
from bench.profiles import PROFILES
from bench.runner import plan
from bench.topology import PREFIX
from lab.podlab import NETNS_DIR
from sockops.cgroups import find_cgroup2_root

REPO = Path(__file__).resolve().parent.parent


def bench_leftovers() -> set[str]:
    """Namespaces, cgroups, bpffs directories, temp dirs and processes carrying the bench prefix."""
    found: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        found |= {f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(PREFIX + "-")}
    with contextlib.suppress(RuntimeError):
        found |= {f"cgroup {p}" for p in find_cgroup2_root().glob(f"{PREFIX}-*")}
    found |= {f"bpffs {p}" for p in Path("/sys/fs/bpf").glob(f"{PREFIX}-*")}
    found |= {f"tmp {p}" for p in Path("/tmp").glob(f"{PREFIX}-*")}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if PREFIX + "-" in cmd and "pytest" not in cmd:
                found.add(f"process {pid} {cmd[:80]}")
    return found


def test_plan_interleaves_off_and_on() -> None:
    """Repeats alternate off/on for every configuration (noise must hit both states)."""
    cells = plan(PROFILES["full"])
    http = [c for c in cells if (c.kind, c.mode, c.load, c.connections) == ("http", "both", "closed", 8)]
    assert [c.state for c in http] == ["off", "on"] * PROFILES["full"].repeats
    loaded = [c.state for c in cells if c.kind == "http" and c.mode == "both" and c.connections == 16]
    assert loaded[:3] == ["off", "loaded", "on"]


def test_plan_has_short_lived_connections() -> None:
    """Both profiles measure one request per connection at 16 connections, interleaved like the
    closed loop (with the not-opted-in state where the closed loop has it); --no-short drops them."""
    from bench.__main__ import parser, profile_from

    full = plan(PROFILES["full"])
    short = [c for c in full if c.kind == "http" and c.load == "short"]
    assert {(c.mode, c.connections) for c in short} == {(m, 16) for m in PROFILES["full"].modes}
    both = [c.state for c in short if c.mode == "both"]
    assert both == ["off", "loaded", "on"] * PROFILES["full"].repeats
    assert [c.state for c in short if c.mode == "client"] == ["off", "on"] * PROFILES["full"].repeats
    assert any(c.load == "short" and c.mode == "both" for c in plan(PROFILES["quick"]))

    args = parser("bench").parse_args(["--profile", "quick", "--no-short"])
    assert not [c for c in plan(profile_from(args)) if c.load == "short"]
    args = parser("bench").parse_args(["--profile", "quick", "--no-closed", "--short-connections", "4"])
    http = {(c.load, c.connections) for c in plan(profile_from(args)) if c.kind == "http"}
    assert http == {("short", 4)}


def test_short_load_asks_to_close_every_connection() -> None:
    """wrk reconnects after a response only when the server says Connection: close."""
    from bench.load import HttpLoad

    script = Path("wrk_report.lua")
    short = HttpLoad("http://10.244.2.10:8080/", 16, 3, 1024, short=True).argv(script)
    keep = HttpLoad("http://10.244.2.10:8080/", 16, 3, 1024).argv(script)
    assert short[short.index("-H") + 1] == "Connection: close"
    assert "-H" not in keep


def test_ratios_pair_repeats() -> None:
    """The on/off ratio is taken per repeat (on_i / off_i), then reduced to a median and spread."""
    base = {"kind": "http", "mode": "both", "load": "closed", "connections": 16}
    runs = [
        {**base, "state": state, "rep": rep, "qps": qps}
        for rep, (off, on) in enumerate([(100.0, 150.0), (50.0, 60.0), (80.0, 120.0)])
        for state, qps in (("off", off), ("on", on))
    ]
    (entry,) = stats.ratios(runs)
    assert entry["pairs"] == 3
    assert entry["qps"]["median"] == pytest.approx(1.5)
    assert (entry["qps"]["min"], entry["qps"]["max"]) == (pytest.approx(1.2), pytest.approx(1.5))


def test_summary_schema_rejects_bad_rows() -> None:
    good = {
        "mode": "both",
        "connections": 16,
        "sockops": "on",
        "qps_median": 10.0,
        "p50_ms_median": 1.0,
        "p99_ms_median": 2.0,
        "p50_ms_spread": [0.9, 1.1],
        "runs": 3,
    }
    schema.validate_summary([good])
    for bad in ({**good, "sockops": "maybe"}, {**good, "p50_ms_spread": [1.2, 1.3]}, {**good, "extra": 1}):
        with pytest.raises(schema.SchemaError):
            schema.validate_summary([bad])
    schema.validate_summary([good, {**good, "mode": "both-short"}])
    with pytest.raises(schema.SchemaError):
        schema.validate_summary([{**good, "mode": "both-long"}])


def test_full_schema_wants_connection_counts_of_short_runs() -> None:
    """A short-lived-connection run without the client pod's connection count cannot show that
    every request had its own connection: the result file is refused."""
    meta = {k: "x" for k in schema.META_KEYS}
    run = {
        "kind": "http",
        "mode": "both",
        "load": "short",
        "connections": 16,
        "state": "on",
        "rep": 0,
        "qps": 10.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "errors": 0,
        "tcp_connects": 30,
        "tcp_connect_fails": 0,
        "requests_per_connect": 1.0,
        "sockets_inserted": 60,
    }
    doc = {
        "meta": meta,
        "profile": {},
        "runs": [run],
        "groups": [],
        "ratios": [],
        "targets": {},
        "harness": {},
    }
    schema.validate_full(doc)
    for bad in ({k: v for k, v in run.items() if k != "tcp_connects"}, {**run, "load": "bursty"}):
        with pytest.raises(schema.SchemaError):
            schema.validate_full({**doc, "runs": [bad]})


@pytest.mark.kernel
@pytest.mark.envoy
@pytest.mark.timeout(420)
def test_quick_profile_end_to_end(tmp_path: Path) -> None:
    before = bench_leftovers()
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "quick", "--out", str(out), "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert res.returncode == 0, f"bench failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    rows = json.loads((out / report.SUMMARY_FILE).read_text())
    schema.validate_summary(rows)
    doc = json.loads((out / report.FULL_FILE).read_text())
    schema.validate_full(doc)
    assert doc["meta"]["kernel"].startswith("Linux ")
    assert "1.40" in doc["meta"]["envoy_version"]
    assert "--profile quick" in doc["meta"]["command"]

    # Both sockops states produce numbers in the sidecar mode and the ping-pong floor exists.
    for state in ("off", "on"):
        row = next(r for r in rows if r["mode"] == "both" and r["sockops"] == state)
        assert row["qps_median"] > 0 and row["p50_ms_median"] > 0 and row["runs"] == 2
    assert any(r["mode"] == "pingpong-unix" for r in rows)
    assert any(r["mode"] == "pingpong-tcp" and r["sockops"] == "on" for r in rows)
    assert {r["sockops"] for r in rows if r["mode"] == "both-short"} == {"off", "on"}

    # "on" really redirects through sockops; "off" never does; no request failed.
    http = [r for r in doc["runs"] if r["kind"] == "http"]
    assert all(r["redirected_bytes"] > 0 for r in http if r["mode"] == "both" and r["state"] == "on")
    assert all(r["redirected_bytes"] == 0 for r in http if r["state"] == "off")
    assert all(r["errors"] == 0 for r in http)
    assert all(r["cpu_envoys_s_per_1k"] > 0 for r in http if r["mode"] == "both")
    # Short-lived connections: the client pod opened one connection per request (counted by the
    # kernel, /proc/net/snmp ActiveOpens, not by wrk), none failed, and "on" paired them.
    short = [r for r in http if r["load"] == "short"]
    assert {(r["mode"], r["state"]) for r in short} == {
        (m, s) for m in ("baseline", "both") for s in ("off", "on")
    }
    for r in short:
        assert r["requests"] > 100 and 0.9 <= r["requests_per_connect"] <= 1.01, r
        assert r["tcp_connect_fails"] == 0
    # A run of short-lived connections leaves TIME-WAIT sockets that would slow the next run's
    # connect(): every run starts without any.
    assert all(r["time_wait_left_before"] == 0 for r in http)
    assert all(r["sockets_inserted"] >= r["requests"] for r in short if r["state"] == "on")
    assert all(r["requests_per_connect"] > 5 for r in http if r["load"] == "closed")
    pp_on = [r for r in doc["runs"] if r["mode"] == "pingpong-tcp" and r["state"] == "on"]
    assert pp_on and all(r["redirected_bytes"] > 0 for r in pp_on)

    for name in report.PLOTS:
        path = out / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "| both | 16 | on |" in (out / report.MARKDOWN_FILE).read_text()

    left = bench_leftovers() - before
    assert not left, f"the benchmark left these behind: {sorted(left)}"


def test_sidebyside_takes_ratios_per_repeat(tmp_path: Path) -> None:
    """bench/sidebyside.py pairs each repeat's on and loaded runs with that repeat's off run."""
    from bench import sidebyside

    def run(state: str, rep: int, qps: float, p50: float) -> dict[str, object]:
        return {"kind": "http", "state": state, "rep": rep, "qps": qps, "p50_ms": p50, "p99_ms": 2 * p50}

    for side, on_qps in (("base", 110.0), ("new", 130.0)):
        d = tmp_path / f"{side}-1"
        d.mkdir()
        runs = [run("off", r, 100.0 * (r + 1), 1.0) for r in range(2)]
        runs += [run("loaded", r, 100.0 * (r + 1), 1.0) for r in range(2)]
        runs += [run("on", r, on_qps * (r + 1), 0.5) for r in range(2)]
        (d / "results.json").write_text(json.dumps({"meta": {"sockops_git_commit": side}, "runs": runs}))

    assert sidebyside.main([str(tmp_path)]) == 0
    out = json.loads((tmp_path / "sidebyside.json").read_text())
    assert out["new"]["repeats"] == 2
    assert out["new"]["ratios_median_min_max"]["on_qps"] == [1.3, 1.3, 1.3]  # per repeat, not pooled
    assert out["base"]["ratios_median_min_max"]["on_p50"] == [0.5, 0.5, 0.5]
    assert out["base"]["ratios_median_min_max"]["loaded_qps"] == [1.0, 1.0, 1.0]


def test_sidebyside_compares_one_load(tmp_path: Path) -> None:
    """Closed-loop and short-lived runs of one invocation share repeat numbers: the side-by-side
    pairs each load's runs only with runs of the same load and mode (a mode measured off and on
    only has no loaded ratios)."""
    from bench import sidebyside

    def run(load: str, state: str, qps: float, mode: str = "both") -> dict[str, object]:
        per = {"requests_per_connect": 1.0, "inserted_per_connect": 2.0 if state == "on" else 0.0}
        return {
            "kind": "http",
            "mode": mode,
            "load": load,
            "state": state,
            "rep": 0,
            "qps": qps,
            "p50_ms": 1.0,
            "p99_ms": 2.0,
            **per,
        }

    for side in ("base", "new"):
        d = tmp_path / f"{side}-1"
        d.mkdir()
        runs = [run("closed", "off", 100.0), run("closed", "loaded", 100.0), run("closed", "on", 150.0)]
        runs += [run("short", "off", 10.0), run("short", "loaded", 10.0), run("short", "on", 12.0)]
        # Another mode in the same file, measured off and on only (no not-opted-in state).
        runs += [run("short", "off", 20.0, "baseline"), run("short", "on", 18.0, "baseline")]
        (d / "results.json").write_text(json.dumps({"meta": {"sockops_git_commit": side}, "runs": runs}))

    assert sidebyside.main([str(tmp_path)]) == 0
    closed = json.loads((tmp_path / "sidebyside.json").read_text())
    assert closed["new"]["ratios_median_min_max"]["on_qps"] == [1.5, 1.5, 1.5]
    assert sidebyside.main([str(tmp_path), "--load", "short"]) == 0
    short = json.loads((tmp_path / "sidebyside-short.json").read_text())
    assert short["base"]["ratios_median_min_max"]["on_qps"] == [1.2, 1.2, 1.2]
    assert short["new"]["per_connect_median_min_max"]["on_inserted_per_connect"] == [2.0, 2.0, 2.0]
    assert sidebyside.main([str(tmp_path), "--load", "short", "--mode", "baseline"]) == 0
    baseline = json.loads((tmp_path / "sidebyside-baseline-short.json").read_text())
    assert baseline["new"]["ratios_median_min_max"]["on_qps"] == [0.9, 0.9, 0.9]
    assert "loaded_qps" not in baseline["new"]["ratios_median_min_max"]


def test_sidebyside_leaves_out_disturbed_repeats(tmp_path: Path) -> None:
    """--max-foreign-cpus drops a repeat any of whose runs other work disturbed, and says how many."""
    from bench import sidebyside

    for side in ("base", "new"):
        d = tmp_path / f"{side}-1"
        d.mkdir()
        runs = [
            {
                "kind": "http",
                "state": state,
                "rep": rep,
                "qps": qps,
                "p50_ms": 1.0,
                "p99_ms": 2.0,
                "foreign_cpus": f,
            }
            for rep, f in ((0, 0.0), (1, 1.2))
            for state, qps in (("off", 100.0), ("loaded", 100.0), ("on", 120.0 if rep == 0 else 300.0))
        ]
        (d / "results.json").write_text(json.dumps({"meta": {"sockops_git_commit": side}, "runs": runs}))

    assert sidebyside.main([str(tmp_path), "--max-foreign-cpus", "0.3"]) == 0
    quiet = json.loads((tmp_path / "sidebyside-quiet.json").read_text())
    assert quiet["new"]["repeats"] == 1 and quiet["new"]["repeats_dropped_for_other_work"] == 1
    assert quiet["new"]["ratios_median_min_max"]["on_qps"] == [1.2, 1.2, 1.2]
