"""The reconciler's rules, with an in-memory map (no BPF): what ends up enabled, and when.

The kernel-side effect of the same rules is covered by tests/test_agent.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sockops.breaker import Breaker, Trip
from sockops.errors import NetnsNotFound, SockopsError
from sockops.layout import NetnsSettings
from sockops.maps import Anomalies
from sockops.observe import Report, render
from sockops.reconciler import (
    ACCELERATED,
    ERROR,
    OBSERVING,
    OFF,
    PENDING,
    SUSPENDED,
    Reconciler,
    Resolved,
    Resolver,
)
from sockops.workload import Locator, Workload


class FakeMaps:
    def __init__(self) -> None:
        self.watched: set[int] = set()
        self.conf: dict[int, NetnsSettings] = {}
        self.fail = False
        self.writes = 0
        self.pods: dict[str, int] = {}
        self.anomaly_counts: dict[int, Anomalies] = {}
        self.forgotten: list[int] = []

    def enable(self, cookie: int, settings: NetnsSettings, sync: bool = True) -> None:
        if self.fail:
            raise SockopsError("writing map netns_conf failed: Argument list too long")
        self.writes += 1
        self.conf[cookie] = settings

    def disable(self, cookie: int, sync: bool = True) -> bool:
        return self.conf.pop(cookie, None) is not None

    def enabled(self) -> dict[int, NetnsSettings]:
        return dict(self.conf)

    def netns_stats(self) -> dict[int, dict[str, int]]:
        return {c: {} for c in self.anomaly_counts}  # counters exist where anomalies do

    def sockets(self) -> list[object]:
        return []

    def forget(self, cookie: int) -> None:
        self.forgotten.append(cookie)

    def anomalies(self) -> dict[int, Anomalies]:
        return dict(self.anomaly_counts)

    def watch(self, cookie: int) -> None:
        self.watched.add(cookie)

    def unwatch(self, cookie: int) -> None:
        self.watched.discard(cookie)

    def sync_node_pods(
        self, current: dict[str, int] | None = None, enabled: dict[int, NetnsSettings] | None = None
    ) -> dict[str, int]:
        from sockops.maps import node_pods_for

        self.pods = node_pods_for(self.conf)
        return dict(self.pods)


class FakeResolver(Resolver):
    """Pod UID -> cookie from a dict the test edits; unknown UIDs are "not found yet"."""

    def __init__(self) -> None:
        super().__init__()
        self.cookies: dict[str, int] = {}
        self.settings: dict[int, tuple[str, ...]] = {}
        self.calls = 0

    def resolve(self, w: Workload) -> Resolved:
        self.calls += 1
        uid = w.locator.pod_uid or ""
        if uid not in self.cookies:
            raise NetnsNotFound(f"no process of pod {uid} found yet")
        cookie = self.cookies[uid]
        ips = self.settings.get(cookie, ())
        return Resolved(Path(f"/proc/{cookie}/ns/net"), cookie, NetnsSettings(managed=True, local_ips=ips))


class Observer:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.restarts: list[str] = []
        self.latencies: list[float] = []
        self.passes = 0

    def reconcile_error(self, source: str) -> None:
        self.errors.append(source)

    def watch_restart(self, source: str) -> None:
        self.restarts.append(source)

    def enforced(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def reconciled(self) -> None:
        self.passes += 1


def pod(uid: str, on: bool = True, ns: str = "default", **kw: object) -> Workload:
    return Workload(
        source="kubernetes",
        uid=uid,
        namespace=ns,
        name=f"pod-{uid}",
        accelerate=on,
        reason="pod annotation" if on else "not opted in",
        locator=Locator(pod_uid=uid),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def rec(tmp_path: Path) -> tuple[Reconciler, FakeMaps, FakeResolver, Observer]:
    maps, res, obs = FakeMaps(), FakeResolver(), Observer()
    r = Reconciler(maps, res, ["kubernetes"], observer=obs, state_file=tmp_path / "state.json")
    return r, maps, res, obs


def settle(r: Reconciler, full: bool = False) -> None:
    r.step(r._drain(timeout=0), full=full)


def test_enables_opted_in_pods_only(rec) -> None:
    r, maps, res, _ = rec
    res.cookies.update({"a": 11, "b": 12})
    r.replace("kubernetes", [pod("a"), pod("b", on=False)])
    settle(r)
    assert set(maps.conf) == {11}
    assert maps.conf[11].managed
    states = {s.workload.uid: s.state for s in r.snapshot()}
    assert states == {"a": ACCELERATED, "b": OFF}
    assert r.pod_labels() == {11: ("default", "pod-a")}


def test_toggle_and_delete(rec) -> None:
    r, maps, res, _ = rec
    res.cookies["a"] = 11
    r.replace("kubernetes", [pod("a")])
    settle(r)
    r.upsert(pod("a", on=False))
    settle(r)
    assert maps.conf == {}
    r.upsert(pod("a"))
    settle(r)
    assert set(maps.conf) == {11}
    r.delete("kubernetes", "a")
    settle(r)
    assert maps.conf == {} and r.snapshot() == []


def test_idempotent_writes_only_differences(rec) -> None:
    r, maps, res, _ = rec
    res.cookies["a"] = 11
    r.replace("kubernetes", [pod("a")])
    settle(r)
    for _ in range(3):
        settle(r)
    assert maps.writes == 1


def test_resync_repairs_drift_but_keeps_manual_entries(rec) -> None:
    r, maps, res, _ = rec
    res.cookies["a"] = 11
    r.replace("kubernetes", [pod("a")])
    settle(r)
    maps.conf.pop(11)  # removed by hand
    maps.conf[99] = NetnsSettings(managed=True)  # a stale entry of an earlier agent
    maps.conf[77] = NetnsSettings(managed=False)  # `sockops enable` by an operator
    settle(r, full=True)
    assert set(maps.conf) == {11, 77}


def test_nothing_removed_before_every_source_listed(tmp_path: Path) -> None:
    """A restarted agent must not switch pods off before its sources caught up."""
    maps, res = FakeMaps(), FakeResolver()
    maps.conf[11] = NetnsSettings(managed=True)
    r = Reconciler(maps, res, ["kubernetes", "docker"])
    r.replace("kubernetes", [])
    settle(r, full=True)
    assert 11 in maps.conf and not r.synced
    r.replace("docker", [])
    settle(r, full=True)
    assert maps.conf == {} and r.synced


def test_unresolved_pod_is_pending_then_accelerated(rec) -> None:
    r, maps, res, _ = rec
    r.replace("kubernetes", [pod("late")])
    settle(r)
    (st,) = r.snapshot()
    assert st.state == PENDING and "late" in st.reason
    res.cookies["late"] = 21
    settle(r)  # a retry, no new event
    assert set(maps.conf) == {21}


def test_map_write_failure_is_counted_and_retried(rec) -> None:
    r, maps, res, obs = rec
    res.cookies["a"] = 11
    maps.fail = True
    r.replace("kubernetes", [pod("a")])
    settle(r)
    (st,) = r.snapshot()
    assert st.state == ERROR and "too long" in st.reason
    assert obs.errors == ["kubernetes"]
    maps.fail = False
    settle(r)
    assert set(maps.conf) == {11}


def test_invalid_annotations_are_counted(rec) -> None:
    r, _maps, _res, obs = rec
    r.replace("kubernetes", [pod("a", on=False, errors=('sockops.io/accelerate="yes" is not valid',))])
    settle(r)
    assert obs.errors == ["kubernetes"]


def test_two_workloads_one_namespace(rec) -> None:
    """A pod seen by two sources (or containers sharing a sandbox) enables its netns once."""
    r, maps, res, _ = rec
    res.cookies["a"] = 11
    docker_view = replace(pod("a"), source="docker", uid="c0ffee")
    r.expected_sources.add("docker")
    r.replace("kubernetes", [pod("a")])
    r.replace("docker", [replace(docker_view, locator=Locator(pod_uid="a"))])
    settle(r)
    assert set(maps.conf) == {11}
    r.upsert(pod("a", on=False))  # one view turns off, the other still wants it
    settle(r)
    assert set(maps.conf) == {11}


def test_state_file_says_why(rec, tmp_path: Path) -> None:
    r, _maps, _res, _ = rec
    r.replace("kubernetes", [pod("late"), pod("off", on=False)])
    settle(r)
    doc = json.loads((tmp_path / "state.json").read_text())
    by = {w["uid"]: w for w in doc["workloads"]}
    assert by["late"]["state"] == "pending" and "found yet" in by["late"]["reason"]
    assert by["off"]["state"] == "off"


def test_events_and_latency_observed(rec) -> None:
    r, _maps, res, obs = rec
    res.cookies["a"] = 11
    r.restarted("kubernetes", "410 Gone")
    r.error("kubernetes", "malformed pod object")
    r.replace("kubernetes", [pod("a")])
    settle(r)
    assert obs.restarts == ["kubernetes"]
    assert obs.errors == ["kubernetes"]
    assert len(obs.latencies) == 1 and 0 <= obs.latencies[0] < 1


def test_run_loop_stops_promptly(rec) -> None:
    r, maps, res, _ = rec
    res.cookies["a"] = 11
    stop = threading.Event()
    t = threading.Thread(target=r.run, args=(stop, 30.0))
    t.start()
    r.replace("kubernetes", [pod("a")])
    deadline = time.monotonic() + 5
    while 11 not in maps.conf and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 11 in maps.conf
    stop.set()
    r.upsert(pod("b"))  # wakes the loop
    t.join(timeout=3)
    assert not t.is_alive()


def test_resolver_refuses_host_namespace() -> None:
    with pytest.raises(NetnsNotFound, match="host"):
        Resolver().path(Locator(pid=os.getpid()))


def test_resolver_pod_not_found_says_where_it_looked() -> None:
    with pytest.raises(NetnsNotFound, match="cgroup"):
        Resolver(find_pod=lambda uid: None).path(Locator(pod_uid="0000"))


def test_outbound_capture_switched_off_by_annotation_drops_sidecar_pairing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sockops import reconciler
    from sockops.workload import parse_istio

    capture, errors = parse_istio({"traffic.sidecar.istio.io/includeOutboundPorts": ""})
    assert not errors and not capture.outbound_captured
    seen: list[bool | None] = []

    def settings_for(path: Path, sidecar: bool | None) -> NetnsSettings:
        seen.append(sidecar)
        return NetnsSettings(sidecar=True)

    monkeypatch.setattr(reconciler.netns_mod, "cookie", lambda path: 5)
    res = Resolver(settings_for=settings_for)
    monkeypatch.setattr(res, "path", lambda loc: tmp_path)
    w = Workload("static", "x", "", "x", True, "", Locator(pid=1), sidecar=True, capture=capture)
    out = res.resolve(w)
    assert seen == [True] and out.settings.sidecar is False and out.settings.managed


def test_node_pods_follow_enabled_namespaces_and_ambiguous_ips_pair_nobody(rec) -> None:
    r, maps, res, _ = rec
    res.cookies.update({"a": 11, "b": 12})
    res.settings = {11: ("10.244.1.1",), 12: ("10.244.1.2",)}
    r.replace("kubernetes", [pod("a"), pod("b")])
    settle(r)
    assert maps.pods == {"10.244.1.1": 11, "10.244.1.2": 12}
    r.upsert(pod("b", on=False))
    settle(r)
    assert maps.pods == {"10.244.1.1": 11}


def test_node_pods_for_marks_shared_addresses() -> None:
    from sockops.maps import node_pods_for

    got = node_pods_for(
        {
            11: NetnsSettings(local_ips=("10.244.1.1", "fd00::1")),
            12: NetnsSettings(local_ips=("10.244.1.1",)),
            13: NetnsSettings(local_ips=("10.244.1.3",)),
        }
    )
    assert got == {"10.244.1.1": 0, "fd00::1": 11, "10.244.1.3": 13}


class Notes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def started(self, w: Workload, cookie: int) -> None:
        self.seen.append(("started", w.uid))

    def stopped(self, w: Workload) -> None:
        self.seen.append(("stopped", w.uid))

    def invalid(self, w: Workload) -> None:
        self.seen.append(("invalid", w.uid))

    def suspended(self, w: Workload, trip: Trip) -> None:
        self.seen.append(("suspended", f"{w.uid} {trip.kind} {trip.comm} {trip.pid}"))


def test_observed_pod_is_resolved_reported_never_enabled(tmp_path: Path) -> None:
    """Scanned at first sight and at each full resync (not per event); never a map entry; a flip
    to accelerate enables it, and back to observe disables it (Event: stopped)."""
    maps, res, notes = FakeMaps(), FakeResolver(), Notes()
    scans: list[dict[tuple[str, str], Path]] = []

    def scanner(targets: dict[tuple[str, str], Path]) -> dict[tuple[str, str], Report]:
        scans.append(dict(targets))
        return {k: Report(at=float(len(scans)), processes=len(scans)) for k in targets}

    r = Reconciler(maps, res, ["kubernetes"], state_file=tmp_path / "s.json", notifier=notes, scanner=scanner)
    res.cookies.update({"a": 11, "b": 12})
    watched = pod("a", on=False, observe=True)
    r.replace("kubernetes", [watched, pod("b")])
    settle(r)
    assert set(maps.conf) == {12}
    (st,) = [s for s in r.snapshot() if s.workload.uid == "a"]
    assert st.state == OBSERVING and st.cookie == 11 and st.observed is not None
    assert scans == [{("kubernetes", "a"): Path("/proc/11/ns/net")}]
    r.upsert(pod("b", on=False))  # an event: no new scan
    settle(r)
    assert len(scans) == 1
    settle(r, full=True)
    assert len(scans) == 2 and r.observed() == {("default", "pod-a"): {}}
    doc = json.loads((tmp_path / "s.json").read_text())["workloads"]
    assert doc[0]["state"] == "observing" and doc[0]["observed"]["processes"] == 2
    assert r.counts()[OBSERVING] == 1 and r.pod_labels() == {}

    r.upsert(replace(watched, accelerate=True, observe=False))
    settle(r)
    assert set(maps.conf) == {11} and r.snapshot()[0].observed is None
    r.upsert(watched)
    settle(r)
    assert set(maps.conf) == set() and ("stopped", "a") in notes.seen
    assert r.snapshot()[0].state == OBSERVING and len(scans) == 3  # seen again: scanned at once


def test_a_failing_scanner_never_stops_the_reconciler(rec) -> None:
    r, maps, res, _ = rec

    def boom(targets: object) -> dict[tuple[str, str], Report]:
        raise RuntimeError("scanner bug")

    r.scanner = boom
    res.cookies.update({"a": 11, "b": 12})
    r.replace("kubernetes", [pod("a", on=False, observe=True), pod("b")])
    settle(r)
    assert set(maps.conf) == {12}
    states = {s.workload.uid: (s.state, s.observed) for s in r.snapshot()}
    assert states == {"a": (OBSERVING, None), "b": (ACCELERATED, None)}


class FakeLate:
    """Records each late-insertion pass; ``waiting`` is what the next pass reports back."""

    def __init__(self) -> None:
        self.passes: list[tuple[dict[int, Path], dict[str, int]]] = []
        self.waiting = 0
        self.fail = False

    def run(self, namespaces, node_pods):  # type: ignore[no-untyped-def]
        from sockops.late import PassResult

        self.passes.append((dict(namespaces), dict(node_pods)))
        if self.fail:
            raise RuntimeError("netlink said no")
        return PassResult(len(namespaces), (), self.waiting)


def test_late_pass_after_an_enable_again_while_directions_wait_and_never_fatal(tmp_path: Path) -> None:
    """Connections that predate an enable join at a pass right after it (docs/DATAPLANE.md, "Late
    insertion"); a pass that left directions waiting for their reader makes the loop come back
    within ``retry`` instead of the next resync; a failing pass leaves the pod accelerated."""
    maps, res, late = FakeMaps(), FakeResolver(), FakeLate()
    r = Reconciler(maps, res, ["kubernetes"], state_file=tmp_path / "s.json", late=late, retry=0.5)
    res.cookies.update({"a": 11})
    res.settings[11] = ("10.244.1.10",)
    r.replace("kubernetes", [pod("a")])
    late.waiting = 2
    settle(r)
    assert late.passes == [({11: Path("/proc/11/ns/net")}, {"10.244.1.10": 11})]
    assert r._unresolved() and r._wait_time(r.clock() + 30) <= 0.5  # directions wait: back soon

    late.waiting = 0
    settle(r)  # nothing changed, but directions were waiting
    assert len(late.passes) == 2
    assert not r._unresolved()
    settle(r)  # nothing changed, nothing waiting: no pass
    assert len(late.passes) == 2

    late.fail = True  # a conntrack or iterator error of any kind
    settle(r, full=True)
    assert len(late.passes) == 3
    assert {s.workload.uid: s.state for s in r.snapshot()} == {"a": ACCELERATED}
    assert set(maps.conf) == {11}


# -- the breaker (sockops/breaker.py) --------------------------------------------------------------


def over_budget(n: int, pid: int = 4242, comm: str = "stuck-app") -> Anomalies:
    counts = {"queue_over_budget": n, "redirect_miss": 7 * n, "early_tcp_send": 0}
    return Anomalies(counts, {"queue_over_budget": (pid, comm)} if n else {})


def breaker_rec(tmp_path: Path, cooldown: float = 0.0) -> tuple[Reconciler, FakeMaps, Notes, list[float]]:
    now = [100.0]
    maps, res, notes = FakeMaps(), FakeResolver(), Notes()
    res.cookies.update({"a": 11, "b": 12})
    r = Reconciler(
        maps,
        res,
        ["kubernetes"],
        state_file=tmp_path / "state.json",
        notifier=notes,
        clock=lambda: now[0],
        breaker=Breaker({"queue_over_budget": 1}, cooldown=cooldown, clock=lambda: now[0]),
    )
    return r, maps, notes, now


def states(r: Reconciler) -> dict[str, str]:
    return {s.workload.uid: s.state for s in r.snapshot()}


def test_breaker_trips_on_a_rise_and_names_the_program(tmp_path: Path) -> None:
    r, maps, notes, _ = breaker_rec(tmp_path)
    r.replace("kubernetes", [pod("a"), pod("b")])
    settle(r)
    assert set(maps.conf) == {11, 12}
    maps.anomaly_counts[11] = over_budget(1)
    settle(r)
    assert states(r) == {"a": SUSPENDED, "b": ACCELERATED}
    assert set(maps.conf) == {12}  # disabled for new connections; b untouched
    assert ("suspended", "a queue_over_budget stuck-app 4242") in notes.seen
    st = next(s for s in r.snapshot() if s.workload.uid == "a")
    assert "queue_over_budget" in st.reason and "stuck-app" in st.reason and "4242" in st.reason
    doc = json.loads((tmp_path / "state.json").read_text())
    a = next(w for w in doc["workloads"] if w["uid"] == "a")
    assert a["state"] == SUSPENDED
    assert a["breaker"] == {"kind": "queue_over_budget", "pid": 4242, "comm": "stuck-app", "count": 1}
    assert r.breakers() == {("default", "pod-a"): True, ("default", "pod-b"): False}
    assert r.pod_labels() == {11: ("default", "pod-a"), 12: ("default", "pod-b")}
    settle(r, full=True)  # a resync keeps it suspended, and says so once
    assert states(r)["a"] == SUSPENDED and set(maps.conf) == {12}
    assert [n for n in notes.seen if n[0] == "suspended"] == [
        ("suspended", "a queue_over_budget stuck-app 4242")
    ]


def test_breaker_ignores_counts_from_before_it_saw_the_pod(tmp_path: Path) -> None:
    r, maps, _, _ = breaker_rec(tmp_path)
    maps.anomaly_counts[11] = over_budget(5)  # an earlier agent's, or before this pod opted in
    r.replace("kubernetes", [pod("a")])
    settle(r)
    settle(r)
    assert states(r) == {"a": ACCELERATED}
    maps.anomaly_counts[11] = over_budget(6)
    settle(r)
    assert states(r) == {"a": SUSPENDED}


def test_redirect_misses_alone_never_trip(tmp_path: Path) -> None:
    r, maps, _, _ = breaker_rec(tmp_path)
    r.replace("kubernetes", [pod("a")])
    settle(r)
    maps.anomaly_counts[11] = Anomalies(
        {"queue_over_budget": 0, "redirect_miss": 10**6, "early_tcp_send": 9}, {}
    )
    settle(r)
    assert states(r) == {"a": ACCELERATED}


def test_breaker_resets_on_a_new_reset_annotation(tmp_path: Path) -> None:
    r, maps, notes, _ = breaker_rec(tmp_path)
    r.replace("kubernetes", [pod("a", reset="1")])
    settle(r)
    maps.anomaly_counts[11] = over_budget(1)
    settle(r)
    assert states(r) == {"a": SUSPENDED}
    r.upsert(pod("a", reset="1"))  # another change of the pod, same reset value: stays
    settle(r)
    assert states(r) == {"a": SUSPENDED}
    r.upsert(pod("a", reset="2"))
    settle(r)
    assert states(r) == {"a": ACCELERATED} and set(maps.conf) == {11}
    assert notes.seen[-1] == ("started", "a")
    settle(r)  # the old count is the new baseline
    assert states(r) == {"a": ACCELERATED}
    maps.anomaly_counts[11] = over_budget(2)
    settle(r)
    assert states(r) == {"a": SUSPENDED}


def test_breaker_resets_when_the_pod_opts_out_and_in(tmp_path: Path) -> None:
    r, maps, _, _ = breaker_rec(tmp_path)
    r.replace("kubernetes", [pod("a")])
    settle(r)
    maps.anomaly_counts[11] = over_budget(1)
    settle(r)
    r.upsert(pod("a", on=False))
    settle(r)
    assert states(r) == {"a": OFF}
    r.upsert(pod("a"))
    settle(r)
    assert states(r) == {"a": ACCELERATED} and set(maps.conf) == {11}


def test_breaker_cooldown(tmp_path: Path) -> None:
    r, maps, _, now = breaker_rec(tmp_path, cooldown=60.0)
    r.replace("kubernetes", [pod("a")])
    settle(r)
    maps.anomaly_counts[11] = over_budget(1)
    settle(r)
    now[0] += 59
    settle(r, full=True)
    assert states(r) == {"a": SUSPENDED}
    assert maps.forgotten == []  # a suspended pod keeps its counters
    now[0] += 1
    settle(r)
    assert states(r) == {"a": ACCELERATED} and set(maps.conf) == {11}


def test_breaker_keeps_its_state_when_the_counts_cannot_be_read(tmp_path: Path) -> None:
    r, maps, _, _ = breaker_rec(tmp_path)
    r.replace("kubernetes", [pod("a")])
    settle(r)
    maps.anomaly_counts[11] = over_budget(3)
    settle(r)

    def unreadable() -> dict[int, Anomalies]:
        raise SockopsError("map anomalies: Operation not permitted")

    maps.anomalies = unreadable  # type: ignore[method-assign]
    settle(r)
    assert states(r) == {"a": SUSPENDED}


def test_run_loop_polls_the_breaker(tmp_path: Path) -> None:
    r, _, _, _ = breaker_rec(tmp_path)
    r.breaker_poll = 0.5
    r.replace("kubernetes", [pod("a")])
    settle(r)
    assert r._wait_time(next_resync=r.clock() + 30) == 0.5


def test_observed_pod_is_watched_by_the_splice_guard_and_its_splices_reported(tmp_path: Path) -> None:
    """An observed pod gets an anomaly entry (no netns_conf entry) so the reader hook counts its
    programs' splice() calls; the report names the last one; an observed pod no longer observed is
    unwatched."""
    maps, res = FakeMaps(), FakeResolver()

    def scanner(targets: dict[tuple[str, str], Path]) -> dict[tuple[str, str], Report]:
        return {k: Report(at=1.0) for k in targets}

    r = Reconciler(maps, res, ["kubernetes"], state_file=tmp_path / "s.json", scanner=scanner)
    res.cookies.update({"a": 11})
    watched = pod("a", on=False, observe=True)
    r.replace("kubernetes", [watched])
    settle(r)
    assert maps.watched == {11} and maps.conf == {}
    assert r.snapshot()[0].observed.splice is None

    counts = {"queue_over_budget": 0, "redirect_miss": 0, "early_tcp_send": 0, "splice_reader": 40}
    maps.anomaly_counts[11] = Anomalies(counts, {"splice_reader": (4242, "iocopy")})
    settle(r)
    assert r.snapshot()[0].observed.splice == (40, "iocopy", 4242)
    doc = json.loads((tmp_path / "s.json").read_text())["workloads"][0]["observed"]
    assert doc["splice_readers"] == {"calls": 40, "program": "iocopy", "pid": 4242}
    assert any("iocopy (pid 4242): known to the reader hook" in line for line in render(doc))

    r.upsert(replace(watched, observe=False))
    settle(r)
    assert maps.watched == set()
