"""Prometheus metrics: the exposition is valid, bounded and read at scrape time; after real traffic
in real pods the per-pod counters equal the bytes the pods sent, and a peer that left the sockhash
shows as redirect misses of its pod.

Unit tests use fake maps behind a fake AgentView; kernel tests use the real data plane (fixtures in
conftest.py) and tests/support/pair_traffic.py, whose connections are accepted before their first byte,
so every one pairs and the byte count is exact: ``connections * rounds * 2 * size``, no framing.
"""

from __future__ import annotations

import contextlib
import ctypes
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Plane, wait_drained
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.agentproc import AgentProcess, agents, wait_for
from support.metrics_view import PairTraffic, plane_view, run_pairs, scrape, value

from lab.cgroups import Cgroup
from lab.podlab import Lab
from sockops import layout
from sockops.maps import Anomalies, MapSizes
from sockops.metrics import ENFORCE_LATENCY_BUCKETS, AgentMetrics, MapCollector, build_registry

CONTRACT = {
    "sockops_redirected_bytes_total",
    "sockops_redirected_messages_total",
    "sockops_redirect_misses_total",
    "sockops_sockets_active",
    "sockops_sockmap_capacity",
    "sockops_origdst_entries",
    "sockops_origdst_capacity",
    "sockops_socket_insert_failures_total",
    "sockops_pods_accelerated",
    "sockops_pods_pending",
    "sockops_program_attached",
    "sockops_kernel_supported",
    "sockops_build_info",
    "sockops_reconcile_errors_total",
    "sockops_watch_restarts_total",
    "sockops_enforce_latency_seconds_bucket",
}


# -- fakes ---------------------------------------------------------------------------------------


class FakeMaps:
    """What MapCollector reads from PinnedMaps, with canned values."""

    def __init__(self, stats: dict[int, dict[str, int]] | None = None, sockets: int = 0, pending: int = 0):
        self.stats = stats or {}
        self.n_sockets = sockets
        self.n_pending = pending
        self.counters_value = {name: 10 + idx for name, idx in layout.COUNTERS.items()}
        self.fail: set[str] = set()
        self.anomaly_counts: dict[int, Anomalies] = {}

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            raise OSError(f"reading {what} failed (test)")

    def counters(self) -> dict[str, int]:
        self._maybe_fail("counters")
        return dict(self.counters_value)

    def netns_stats(self) -> dict[int, dict[str, int]]:
        self._maybe_fail("netns_stats")
        return {k: dict(v) for k, v in self.stats.items()}

    def enabled(self) -> dict[int, layout.NetnsSettings]:
        return {k: layout.NetnsSettings() for k in self.stats}

    def sockets(self) -> list[object]:
        self._maybe_fail("sockets")
        return [object()] * self.n_sockets

    def pending(self) -> list[object]:
        return [object()] * self.n_pending

    def anomalies(self) -> dict[int, Anomalies]:
        self._maybe_fail("anomalies")
        return dict(self.anomaly_counts)


def _stats(b: int, m: int, miss: int) -> dict[str, int]:
    return {
        "redirected_bytes": b,
        "redirected_msgs": m,
        "misses": miss,
        "sockets_inserted": 2,
        "connections_passed": 0,
    }


class FakeView:
    def __init__(self, maps: FakeMaps | None, labels: dict[int, tuple[str, str]] | None = None) -> None:
        self.maps = maps
        self.labels = labels or {}
        self.attached = {"sock_ops": True, "sk_msg": True}
        self.supported = True
        self.sizes = MapSizes(sockhash=100, pending=50, netns=10)
        self.calls = 0
        self.breakers_value: dict[tuple[str, str], bool] = {}

    @contextlib.contextmanager
    def open_maps(self) -> Iterator[Any]:
        self.calls += 1
        yield self.maps

    def pod_labels(self) -> dict[int, tuple[str, str]]:
        self.calls += 1
        return dict(self.labels)

    def pods_accelerated(self) -> int:
        self.calls += 1
        return len(self.labels)

    def pods_pending(self) -> int:
        self.calls += 1
        return 3

    def programs_attached(self) -> dict[str, bool]:
        self.calls += 1
        return dict(self.attached)

    def kernel_supported(self) -> bool:
        self.calls += 1
        return self.supported

    def map_sizes(self) -> MapSizes:
        self.calls += 1
        return self.sizes

    def breakers(self) -> dict[tuple[str, str], bool]:
        self.calls += 1
        return dict(self.breakers_value)


class ExplodingView:
    """Every method fails the test: proves that registering and describing read nothing."""

    def __getattr__(self, name: str) -> Any:
        def boom(*a: Any, **k: Any) -> Any:
            raise AssertionError(f"AgentView.{name}() was called outside a scrape")

        return boom


def _fake_setup(pod_labels: str = "pod", **kw: Any) -> tuple[CollectorRegistry, AgentMetrics, FakeView]:
    maps = FakeMaps(
        stats={
            101: _stats(1000, 10, 1),
            102: _stats(500, 5, 0),  # second netns of the same pod (sandbox re-created)
            103: _stats(7, 1, 2),  # accelerated by hand: no pod known
            104: _stats(40, 4, 0),
        },
        sockets=80,
        pending=5,
    )
    view = FakeView(maps, {101: ("shop", "cart"), 102: ("shop", "cart"), 104: ("web", "front")})
    registry, metrics = build_registry(view, pod_labels)
    return registry, metrics, view


# -- unit tests ----------------------------------------------------------------------------------


def test_exposition_parses_and_has_the_contract() -> None:
    registry, metrics, _ = _fake_setup()
    metrics.init_source("kubernetes")
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = {s.name for f in families.values() for s in f.samples}
    assert names >= CONTRACT, sorted(CONTRACT - names)
    s = scrape(registry)
    assert value(s, "sockops_redirected_bytes_total", namespace="shop", pod="cart") == 1500
    assert value(s, "sockops_redirected_messages_total", namespace="shop", pod="cart") == 15
    assert value(s, "sockops_redirect_misses_total", namespace="shop", pod="cart") == 1
    assert value(s, "sockops_redirected_bytes_total", namespace="web", pod="front") == 40
    # A cookie without a pod name is summed under namespace="", pod="".
    assert value(s, "sockops_redirected_bytes_total", namespace="", pod="") == 7
    assert value(s, "sockops_redirect_misses_total", namespace="", pod="") == 2
    assert value(s, "sockops_sockets_active") == 80
    assert value(s, "sockops_sockmap_capacity") == 100
    assert value(s, "sockops_origdst_entries") == 5
    assert value(s, "sockops_origdst_capacity") == 50
    c = {name: 10 + idx for name, idx in layout.COUNTERS.items()}
    assert (
        value(s, "sockops_socket_insert_failures_total", reason="map_full") == c["insert_failures_map_full"]
    )
    assert value(s, "sockops_socket_insert_failures_total", reason="busy") == c["insert_failures_busy"]
    assert value(s, "sockops_socket_insert_failures_total", reason="other") == c["insert_failures_other"]
    assert value(s, "sockops_connections_paired_total", how="mirror") == c["paired_mirror"]
    assert value(s, "sockops_connections_paired_total", how="origdst") == c["paired_origdst"]
    assert value(s, "sockops_connections_passed_total") == c["connections_passed"]
    assert value(s, "sockops_origdst_insert_failures_total") == c["pending_full"]
    assert value(s, "sockops_pods_accelerated") == 3
    assert value(s, "sockops_pods_pending") == 3
    assert value(s, "sockops_program_attached", program="sock_ops") == 1
    assert value(s, "sockops_program_attached", program="sk_msg") == 1
    assert value(s, "sockops_kernel_supported") == 1
    assert value(s, "sockops_maps_loaded") == 1
    assert value(s, "sockops_scrape_errors_total") == 0
    assert value(s, "sockops_reconcile_errors_total", source="kubernetes") == 0
    assert families["sockops_redirected_bytes"].type == "counter"
    assert families["sockops_sockets_active"].type == "gauge"
    assert families["sockops_enforce_latency_seconds"].type == "histogram"


def test_describe_and_register_read_nothing() -> None:
    """Registering (the registry calls describe()) and describing never touch the view or maps;
    a scrape does, and survives a view that fails (counted, health of the rest still served)."""
    registry, _ = build_registry(ExplodingView())  # type: ignore[arg-type]
    collector = MapCollector(ExplodingView())  # type: ignore[arg-type]
    described = {m.name for m in collector.describe()}
    _, _, view = _fake_setup()
    assert view.calls == 0
    # ... and what describe() announces is what collect() yields.
    collected = {m.name for m in MapCollector(view).collect()}
    assert view.calls > 0
    assert described == collected
    s = scrape(registry)
    assert value(s, "sockops_scrape_errors_total") == 1
    assert value(s, "sockops_maps_loaded") == 0


def test_label_sets_are_bounded() -> None:
    """Only namespace/pod, reason, how, program (fixed values) and build labels; no address."""
    registry, _, view = _fake_setup()
    view.attached = {"sock_ops": True, "sk_msg": False, "something_else": True}
    s = scrape(registry)
    allowed = {
        "namespace", "pod", "reason", "how", "program", "source", "le", "version", "kernel", "kind",
        "implementation", "major", "minor", "patchlevel", "event",
    }  # fmt: skip
    for name, series in s.items():
        for labels in series:
            assert {k for k, _ in labels} <= allowed, (name, labels)
    assert set(s["sockops_program_attached"]) == {
        (("program", "sk_msg"),),
        (("program", "sock_ops"),),
        (("program", "skb_egress"),),
    }
    assert value(s, "sockops_program_attached", program="sk_msg") == 0
    assert {dict(k)["reason"] for k in s["sockops_socket_insert_failures_total"]} == {
        "map_full",
        "busy",
        "other",
        "ambiguous",
    }
    assert {dict(k)["reason"] for k in s["sockops_sockets_not_eligible_total"]} == {
        "mptcp",
        "fastopen",
        "blocking_reader",
        "splice_reader",
        "unproven_reader",
    }
    assert {dict(k)["event"] for k in s["sockops_late_sockets_total"]} == {"inserted", "switched", "pruned"}
    pods = {tuple(v for _, v in k) for k in s["sockops_redirected_bytes_total"]}
    assert pods == {("shop", "cart"), ("web", "front"), ("", "")}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # cookies 101+102 are shop/cart (1000+500 bytes), 104 web/front (40), 103 nobody's (7)
        ("pod", {("shop", "cart"): 1500, ("web", "front"): 40, ("", ""): 7}),
        ("namespace", {("shop", ""): 1500, ("web", ""): 40, ("", ""): 7}),
        ("off", {("", ""): 1547}),
    ],
)
def test_pod_metric_labels_setting_bounds_the_series(mode: str, expected: dict[tuple[str, str], int]) -> None:
    """SOCKOPS_POD_METRIC_LABELS: the same label names in every mode, fewer values, and the sums
    keep every byte (node totals do not change with the mode)."""
    registry, _, _ = _fake_setup(pod_labels=mode)
    s = scrape(registry)
    for family in (
        "sockops_redirected_bytes_total", "sockops_redirected_messages_total",
        "sockops_redirect_misses_total", "sockops_pod_sockets_inserted_total",
    ):  # fmt: skip
        assert {tuple(dict(k)[n] for n in ("namespace", "pod")) for k in s[family]} == set(expected), family
    got = {(dict(k)["namespace"], dict(k)["pod"]): v for k, v in s["sockops_redirected_bytes_total"].items()}
    assert got == expected


def test_anomalies_and_breakers_per_pod() -> None:
    """sockops_app_anomalies_total by pod and kind (every kind present, cookies of one pod summed,
    unknown cookies under ""), and sockops_breaker_open per accelerated or suspended pod."""
    registry, _, view = _fake_setup()
    assert view.maps is not None
    view.maps.anomaly_counts = {
        101: Anomalies({"queue_over_budget": 1, "redirect_miss": 3, "early_tcp_send": 0}, {}),
        102: Anomalies({"queue_over_budget": 2, "redirect_miss": 0, "early_tcp_send": 1}, {}),
        103: Anomalies({"queue_over_budget": 0, "redirect_miss": 5, "early_tcp_send": 0}, {}),
    }
    view.breakers_value = {("shop", "cart"): True, ("web", "front"): False}
    s = scrape(registry)
    assert (
        value(s, "sockops_app_anomalies_total", namespace="shop", pod="cart", kind="queue_over_budget") == 3
    )
    assert value(s, "sockops_app_anomalies_total", namespace="shop", pod="cart", kind="redirect_miss") == 3
    assert value(s, "sockops_app_anomalies_total", namespace="shop", pod="cart", kind="early_tcp_send") == 1
    assert value(s, "sockops_app_anomalies_total", namespace="", pod="", kind="redirect_miss") == 5
    assert {dict(k)["kind"] for k in s["sockops_app_anomalies_total"]} == set(layout.ANOMALIES)
    assert value(s, "sockops_breaker_open", namespace="shop", pod="cart") == 1
    assert value(s, "sockops_breaker_open", namespace="web", pod="front") == 0
    assert value(s, "sockops_scrape_errors_total") == 0


def test_pod_metric_labels_setting_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="use one of pod, namespace, off"):
        build_registry(FakeView(None), "pods")


class ObservingView(FakeView):
    """A view with pods in observe mode (the agent's Agent.observed_sockets)."""

    def __init__(self) -> None:
        super().__init__(FakeMaps())
        self.observed = {
            ("shop", "cart"): {
                ("connected", "nonblocking", "accelerated"): 5,
                ("accepted", "blocking", "plain_tcp"): 1,
            },
            ("shop", "legacy"): {("connected", "blocking", "plain_tcp"): 2},
            ("web", "front"): {("accepted", "blocking", "accelerated_exposed"): 3},
        }

    def observed_sockets(self) -> dict[tuple[str, str], dict[tuple[str, str, str], int]]:
        self.calls += 1
        return self.observed


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("pod", {("shop", "cart", "connected", "nonblocking", "accelerated"): 5,
                 ("shop", "cart", "accepted", "blocking", "plain_tcp"): 1,
                 ("shop", "legacy", "connected", "blocking", "plain_tcp"): 2,
                 ("web", "front", "accepted", "blocking", "accelerated_exposed"): 3}),
        ("namespace", {("shop", "", "connected", "nonblocking", "accelerated"): 5,
                       ("shop", "", "accepted", "blocking", "plain_tcp"): 1,
                       ("shop", "", "connected", "blocking", "plain_tcp"): 2,
                       ("web", "", "accepted", "blocking", "accelerated_exposed"): 3}),
        ("off", {("", "", "connected", "nonblocking", "accelerated"): 5,
                 ("", "", "accepted", "blocking", "plain_tcp"): 1,
                 ("", "", "connected", "blocking", "plain_tcp"): 2,
                 ("", "", "accepted", "blocking", "accelerated_exposed"): 3}),
    ],
)  # fmt: skip
def test_observed_sockets_follow_the_pod_label_setting(
    mode: str, expected: dict[tuple[str, ...], int]
) -> None:
    """sockops_observed_sockets: one series per pod and (role, style, verdict), no program label,
    summed over what SOCKOPS_POD_METRIC_LABELS leaves out; a view without it exports none."""
    view = ObservingView()
    registry, _ = build_registry(view, mode)
    s = scrape(registry)
    names = ("namespace", "pod", "role", "style", "verdict")
    got = {tuple(dict(k)[n] for n in names): v for k, v in s["sockops_observed_sockets"].items()}
    assert got == expected
    assert value(s, "sockops_scrape_errors_total") == 0
    registry, _, _ = _fake_setup()
    assert "sockops_observed_sockets" not in scrape(registry)


def test_a_pod_that_is_gone_leaves_the_output() -> None:
    registry, _, view = _fake_setup()
    assert value(scrape(registry), "sockops_redirected_bytes_total", namespace="web", pod="front") == 40
    # The agent forgets the pod and drops its stats entry.
    del view.labels[104]
    assert view.maps is not None
    del view.maps.stats[104]
    s = scrape(registry)
    assert all(dict(k).get("pod") != "front" for k in s["sockops_redirected_bytes_total"])
    assert all(dict(k).get("pod") != "front" for k in s["sockops_redirect_misses_total"])
    assert value(s, "sockops_pods_accelerated") == 2


def test_not_loaded_serves_health_without_map_series() -> None:
    """No pinned maps: health gauges still say why; map-derived counters are absent, not 0."""
    view = FakeView(None, {})
    view.attached = {"sock_ops": False, "sk_msg": False}
    registry, _ = build_registry(view)
    s = scrape(registry)
    assert value(s, "sockops_maps_loaded") == 0
    assert value(s, "sockops_program_attached", program="sock_ops") == 0
    assert value(s, "sockops_sockmap_capacity") == 100
    assert "sockops_sockets_active" not in s
    assert "sockops_redirected_bytes_total" not in s
    assert "sockops_socket_insert_failures_total" not in s
    assert value(s, "sockops_scrape_errors_total") == 0


def test_read_errors_are_counted_and_the_rest_is_served() -> None:
    registry, _, view = _fake_setup()
    assert view.maps is not None
    view.maps.fail = {"counters", "sockets"}
    s = scrape(registry)
    assert value(s, "sockops_scrape_errors_total") == 1
    assert "sockops_socket_insert_failures_total" not in s
    assert "sockops_sockets_active" not in s
    assert value(s, "sockops_redirected_bytes_total", namespace="shop", pod="cart") == 1500
    assert value(s, "sockops_program_attached", program="sk_msg") == 1
    assert value(scrape(registry), "sockops_scrape_errors_total") == 2
    view.maps.fail = set()
    assert value(scrape(registry), "sockops_scrape_errors_total") == 2


def test_agent_metrics() -> None:
    registry = CollectorRegistry()
    m = AgentMetrics(registry, version="9.9.9", kernel="6.18.0-test")
    m.init_source("docker")
    m.reconcile_errors.labels(source="docker").inc()
    m.watch_restarts.labels(source="docker").inc(2)
    for seconds in (0.0005, 0.004, 0.2, 12.0, 45.0):
        m.enforce_latency.observe(seconds)
    s = scrape(registry)
    assert value(s, "sockops_build_info", version="9.9.9", kernel="6.18.0-test") == 1
    assert value(s, "sockops_reconcile_errors_total", source="docker") == 1
    assert value(s, "sockops_watch_restarts_total", source="docker") == 2
    assert value(s, "sockops_reconciles_total", source="docker") == 0
    assert value(s, "sockops_enforce_latency_seconds_bucket", le="0.001") == 1
    assert value(s, "sockops_enforce_latency_seconds_bucket", le="30.0") == 4
    assert value(s, "sockops_enforce_latency_seconds_bucket", le="+Inf") == 5
    assert ENFORCE_LATENCY_BUCKETS[0] == 0.001 and ENFORCE_LATENCY_BUCKETS[-1] == 30.0


def test_two_registries_do_not_collide() -> None:
    """No global registry: two agents (or tests) in one process each get their own metrics."""
    (r1, m1, _), (r2, _m2, _) = _fake_setup(), _fake_setup()
    m1.reconcile_errors.labels(source="static").inc()
    assert value(scrape(r1), "sockops_reconcile_errors_total", source="static") == 1
    assert value(scrape(r2), "sockops_reconcile_errors_total", source="static") is None


# -- kernel tests --------------------------------------------------------------------------------


def remove_server_ends(plane: Plane, cookie: int) -> int:
    """Take the server end of every held connection of the pod out of the sockhash.

    This is how a peer stops being accelerated under a live connection (a socket removed from the
    map: by hand with bpftool, or its psock torn down): the client keeps its psock and its
    REDIRECT decision, and each of its messages now misses and goes over TCP. Nothing is unread in
    the server's psock at this point (every round trip completed), so no byte is lost.
    """
    removed = 0
    for key in plane.maps.sockets():
        if key.netns == cookie and key.role == layout.ROLE_SERVER:
            assert plane.maps._delete(layout.MAP_SOCKHASH, key)
            removed += 1
    return removed


@pytest.mark.kernel
@pytest.mark.timeout(90)
def test_scrape_shows_pod_bytes_and_misses(dataplane: Plane, lab: Lab) -> None:
    """Two pods, both enabled. ``cart``: plain same-pod traffic, every connection paired; its
    redirected bytes equal what it sent. ``front``: its connections pair, then their server ends
    leave the sockhash while they are open; every client message after that is a miss of
    ``front`` (and goes over TCP, intact), and its redirected bytes stop growing."""
    cart = lab.add_pod("cart", ip="10.244.1.10", sidecar=False)
    front = lab.add_pod("front", ip="10.244.1.11", sidecar=False)
    cookies = {"cart": dataplane.enable(cart), "front": dataplane.enable(front)}
    view = plane_view(
        dataplane, MapSizes(), {cookies["cart"]: ("shop", "cart"), cookies["front"]: ("web", "front")}
    )
    registry, _ = build_registry(view)
    conns, size, rounds = 4, 1000, 25

    res = run_pairs(cart, conns, size, rounds)
    assert res == {"bytes": conns * rounds * 2 * size, "messages": 2 * conns * rounds, "mismatches": 0}

    held_traffic = PairTraffic(front, conns, size, rounds, hold=True)
    held = held_traffic.held()
    assert held["bytes"] == conns * rounds * 2 * size
    s = scrape(registry)
    assert value(s, "sockops_sockets_active") == 2 * conns  # front's connections, both ends
    assert remove_server_ends(dataplane, cookies["front"]) == conns
    res_front = held_traffic.finish()
    assert res_front["mismatches"] == 0

    c = dataplane.counters()
    assert c["connections_passed"] == 0 and c["paired_mirror"] == 2 * conns, c
    s = scrape(registry)
    assert value(s, "sockops_redirected_bytes_total", namespace="shop", pod="cart") == res["bytes"]
    assert value(s, "sockops_redirected_messages_total", namespace="shop", pod="cart") == res["messages"]
    assert value(s, "sockops_redirect_misses_total", namespace="shop", pod="cart") == 0
    # front: the first phase redirected both ways, the second missed once per client message.
    assert value(s, "sockops_redirected_bytes_total", namespace="web", pod="front") == held["bytes"]
    assert value(s, "sockops_redirect_misses_total", namespace="web", pod="front") == conns * rounds
    assert value(s, "sockops_connections_paired_total", how="mirror") == 2 * conns
    assert value(s, "sockops_socket_insert_failures_total", reason="map_full") == 0
    assert value(s, "sockops_program_attached", program="sock_ops") == 1
    assert value(s, "sockops_program_attached", program="sk_msg") == 1
    assert value(s, "sockops_netns_enabled") == 2
    assert value(s, "sockops_scrape_errors_total") == 0
    assert ("", "") not in {tuple(v for _, v in k) for k in s["sockops_redirected_bytes_total"]}

    # The agent forgets front (pod deleted): its series leave the output.
    dataplane.maps.disable(cookies["front"])
    dataplane.maps.forget(cookies["front"])
    del view.labels[cookies["front"]]
    s = scrape(registry)
    assert {dict(k)["pod"] for k in s["sockops_redirected_bytes_total"]} == {"cart"}
    wait_drained(dataplane)


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_scrape_cost_with_many_sockets(dataplane: Plane, lab: Lab) -> None:
    """Scrape time grows with the sockhash (an O(n) key walk). Timed here with 4096 sockets
    inserted from user space in a pod's netns; a full default map (65,536) measured ~90 ms on
    this VM (see sockops/metrics.py)."""
    pod = lab.add_pod("many", ip="10.244.1.10", sidecar=False)
    n_conns = 2048
    fd = dataplane.maps.fds[layout.MAP_SOCKHASH]
    lib = dataplane.maps._lib
    socks: list[socket.socket] = []
    lst = pod.socket()
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(4096)
        for i in range(n_conns):
            c = pod.socket()
            socks.append(c)
            c.connect(lst.getsockname())
            a, _ = lst.accept()
            socks.append(a)
            for sk, role in ((c, layout.ROLE_CLIENT), (a, layout.ROLE_SERVER)):
                key = layout.SockKey(netns=1, client_port=i, role=role)
                v = ctypes.c_uint32(sk.fileno())
                assert lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(v), 0) == 0
        registry, _ = build_registry(plane_view(dataplane, MapSizes(), {}))
        t = time.monotonic()
        s = scrape(registry)
        elapsed = time.monotonic() - t
        assert value(s, "sockops_sockets_active") == 2 * n_conns
        reported = value(s, "sockops_scrape_duration_seconds")
        assert reported is not None and reported <= elapsed
        print(f"scrape with {2 * n_conns} sockets: {elapsed * 1000:.1f} ms (maps {reported * 1000:.1f} ms)")
        assert elapsed < 2.0
    finally:
        for sk in socks:
            sk.close()
        lst.close()


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_agent_pod_metric_labels_setting(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> None:
    """The real agent, its setting from the environment as the DaemonSet's ConfigMap gives it:
    two pods' bytes as two series by default, one node total with SOCKOPS_POD_METRIC_LABELS=off
    (an agent restart keeps the pinned counters, so the total is the sum of the two)."""
    from conftest import BPFFS_ROOT, TEST_PREFIX

    bpffs = BPFFS_ROOT / f"{TEST_PREFIX}-podlabels-{secrets.token_hex(3)}"
    pods = [lab.add_pod(n, ip=f"10.244.1.{20 + i}", sidecar=False) for i, n in enumerate(("cart", "front"))]
    args = ["--source", "static", *[a for p in pods for a in ("--netns", p.netns)]]

    def bytes_series(agent: AgentProcess) -> dict[tuple[str, str], float]:
        return {
            (dict(labels)["namespace"], dict(labels)["pod"]): v
            for (name, labels), v in agent.metrics().items()
            if name == "sockops_redirected_bytes_total"
        }

    with agents(cgroup.path, bpffs) as started:
        agent = AgentProcess(cgroup.path, bpffs, tmp_path, args, name="per-pod")
        started.append(agent)
        agent.wait_ready()
        wait_for(lambda: agent.metric("sockops_pods_accelerated") == 2, 30, "both pods accelerated")
        sent = {p.netns: run_pairs(p, 2, 1000, 5)["bytes"] for p in pods}
        assert bytes_series(agent) == {("", netns): float(b) for netns, b in sent.items()}
        assert agent.stop() == 0

        agent = AgentProcess(
            cgroup.path, bpffs, tmp_path, args, env={"SOCKOPS_POD_METRIC_LABELS": "off"}, name="off"
        )
        started.append(agent)
        agent.wait_ready()
        wait_for(lambda: agent.metric("sockops_pods_accelerated") == 2, 30, "both pods accelerated")
        assert bytes_series(agent) == {("", ""): float(sum(sent.values()))}
        assert agent.stop() == 0
