"""Prometheus metrics of the agent: what it accelerates, per pod, and whether it is in trouble.

Two kinds of metrics, on one explicit :class:`~prometheus_client.CollectorRegistry` (no global
registry, nothing read at import, so tests and a second agent in one process never collide):

* :class:`AgentMetrics`: what the agent's own code observes (reconcile errors, watch restarts,
  enforce latency, build info). The agent holds the object and updates it as things happen.
* :class:`MapCollector`: what the kernel holds (bytes redirected per pod, sockets in the sockhash,
  insert failures, attached programs). These are read from the pinned BPF maps *at scrape time*
  through an :class:`AgentView`, instead of being copied into client-side metrics by a polling
  loop: a scrape then always shows the maps as they are, and a dead poller cannot freeze them.
  ``describe()`` returns the fixed list of families without touching the maps, so registering the
  collector reads nothing.

Label cardinality is bounded by construction: per-pod series carry only ``namespace`` and ``pod``
(never an address or a port), and exist only for network namespaces that have a stats entry in the
``netns_stats`` map (at most ``MapSizes.netns``). Stats of a netns cookie the agent cannot name
(enabled by hand with ``sockops enable``, or a pod the agent already forgot while its connections
still run) are summed into one series with ``namespace=""`` and ``pod=""``, so node totals stay
complete; that series can go down when a cookie leaves it, which Prometheus treats as a counter
reset. A pod that is gone leaves the output at the next scrape, because every scrape is built from
scratch from the maps and the view.

Cost of a scrape: counting the sockhash and the original-destination map walks their keys with
``bpf(BPF_MAP_GET_NEXT_KEY)``, O(entries). Measured on this VM (2 vCPU shared, kernel 6.18) with a
full sockhash of 65,536 sockets: 90-120 ms for ``PinnedMaps.sockets()`` (a bare key walk without
building key objects: 60-70 ms), 105-115 ms for a whole ``generate_latest()``; everything else the
collector reads takes under a millisecond. That is acceptable at a 15-30 s scrape interval, and
``sockops_scrape_duration_seconds`` shows it. If it is not (bigger maps, several scrapers), the
fix is a gauge kept by the data plane: a per-CPU counter incremented where a socket enters the
sockhash and decremented on its removal (withdraw, and the TCP_CLOSE state callback of a socket
with ``in_map`` set), read like the other counters in O(CPUs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

import sockops
from sockops import layout
from sockops.maps import Anomalies, MapSizes, PinnedMaps

log = logging.getLogger(__name__)

# Enforce latency goes from a few ms (a local annotation change applied at once) to tens of
# seconds (namespace not resolvable until the pod's first process starts, API backoff).
ENFORCE_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The programs sockops attaches; the label set of sockops_program_attached is exactly this.
PROGRAMS = ("sock_ops", "sk_msg", "skb_egress")  # links.ATTACHMENTS kinds

# Global counters (layout.COUNTERS) -> (family, label value or None). Families with a label are
# emitted once with every label value, so a reason that never happened still shows as 0.
INSERT_FAILURE_REASONS = {
    "insert_failures_map_full": "map_full",
    "insert_failures_busy": "busy",
    "insert_failures_other": "other",
    "pending_ambiguous": "ambiguous",
}
NOT_ELIGIBLE_REASONS = {
    "skipped_mptcp": "mptcp",
    "skipped_fastopen": "fastopen",
    "skipped_blocking": "blocking_reader",
    "skipped_splicer": "splice_reader",
    "skipped_unproven": "unproven_reader",
}
PAIRED_HOW = {"paired_mirror": "mirror", "paired_origdst": "origdst"}
LATE_EVENTS = {"late_inserted": "inserted", "late_switched": "switched", "late_pruned": "pruned"}

UNKNOWN_POD = ("", "")
# How much of a workload's name the per-pod families carry (SOCKOPS_POD_METRIC_LABELS): the label
# names stay namespace and pod in every mode, so queries and dashboards work unchanged; what is
# switched off is left empty and summed over, which is what bounds the series count.
POD_LABEL_MODES = ("pod", "namespace", "off")


class AgentView(Protocol):
    """What the collector needs from the agent, read at each scrape. The agent implements it.

    Every method must be cheap and must not block on the network: a scrape runs it inline.
    """

    def open_maps(self) -> contextlib.AbstractContextManager[PinnedMaps | None]:
        """The pinned maps, opened for one scrape; yields None when the data plane is not loaded."""
        ...

    def pod_labels(self) -> dict[int, tuple[str, str]]:
        """netns cookie -> (namespace, pod) of every accelerated workload."""
        ...

    def pods_accelerated(self) -> int: ...

    def pods_pending(self) -> int:
        """Opted in, but the pod's network namespace is not resolved yet."""
        ...

    def programs_attached(self) -> dict[str, bool]:
        """{"sock_ops": bool, "sk_msg": bool}"""
        ...

    def kernel_supported(self) -> bool: ...

    def map_sizes(self) -> MapSizes: ...

    def observed_sockets(self) -> dict[tuple[str, str], dict[tuple[str, str, str], int]]:
        """(namespace, pod) -> sockets by (role, style, verdict) of pods in observe mode.

        Optional: a view without it exports no ``sockops_observed_sockets`` series."""
        ...

    def breakers(self) -> dict[tuple[str, str], bool]:
        """(namespace, pod) -> breaker open, for accelerated and suspended pods (sockops/breaker.py).

        Optional: a view without it exports no ``sockops_breaker_open`` series."""
        ...


class AgentMetrics:
    """Metrics the agent updates itself. Create one per registry (see :func:`build_registry`).

    Attributes the agent calls:

    * ``reconcile_errors.labels(source=...).inc()``: a reconcile pass (or one workload in it) failed;
    * ``watch_restarts.labels(source=...).inc()``: a source's watch/event stream was re-opened
      after an error, a 410 Gone or a dropped connection;
    * ``enforce_latency.observe(seconds)``: from a desired-state change seen by a source to the map
      state written for it;
    * ``reconciles.labels(source=...).inc()``: a reconcile pass completed (the denominator of an
      error ratio);
    * ``last_reconcile.set_to_current_time()``: after every successful reconcile or resync, so a
      stuck reconciler is visible as an old timestamp.

    Call :meth:`init_source` once per configured source: a counter whose first sample is already
    1 hides that first increase from ``increase()``/``rate()`` in alerts.
    """

    def __init__(self, registry: CollectorRegistry, version: str | None = None, kernel: str | None = None):
        def per_source(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, ["source"], registry=registry)

        self.reconcile_errors = per_source(
            "sockops_reconcile_errors",
            "Reconcile passes or workloads that failed (desired state not written to the maps).",
        )
        self.reconciles = per_source("sockops_reconciles", "Reconcile passes completed, per source.")
        self.watch_restarts = per_source(
            "sockops_watch_restarts",
            "Times a source's watch or event stream was re-opened (error, 410 Gone, dropped stream).",
        )
        self.enforce_latency = Histogram(
            "sockops_enforce_latency_seconds",
            "Time from a desired-state change seen by a source to the BPF map state written for it.",
            buckets=ENFORCE_LATENCY_BUCKETS,
            registry=registry,
        )
        self.workloads = Gauge(
            "sockops_workloads",
            "Workloads the sources report, by what the agent did with them "
            "(accelerated, pending, off, error), as of the last reconcile.",
            ["state"],
            registry=registry,
        )
        self.last_reconcile = Gauge(
            "sockops_last_reconcile_success_timestamp_seconds",
            "Unix time of the last reconcile or resync that completed without error.",
            registry=registry,
        )
        self.build_info = Gauge(
            "sockops_build_info",
            "Always 1; the labels say which sockops version runs on which kernel.",
            ["version", "kernel"],
            registry=registry,
        )
        self.build_info.labels(version or sockops.__version__, kernel or os.uname().release).set(1)

    def init_source(self, source: str) -> None:
        """Create the per-source series at 0 so the first error is seen as an increase."""
        for counter in (self.reconcile_errors, self.reconciles, self.watch_restarts):
            counter.labels(source=source)


T = TypeVar("T")


class MapCollector(Collector):
    """Reads the pinned maps and the agent's view at every scrape (see the module docstring).

    A failure to read part of the state is counted in ``sockops_scrape_errors_total`` and logged;
    the rest of the scrape is still served, so an unreadable map does not blind the health
    metrics (programs attached, kernel supported) that say why.
    """

    def __init__(self, view: AgentView, pod_labels: str = "pod") -> None:
        if pod_labels not in POD_LABEL_MODES:
            raise ValueError(f"pod_labels={pod_labels!r}: use one of {', '.join(POD_LABEL_MODES)}")
        self.view = view
        self.pod_labels = pod_labels
        self._errors = 0
        self._lock = threading.Lock()  # two Prometheus servers may scrape at once

    # -- describe: names and types only, reads nothing ----------------------------------------
    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    @staticmethod
    def _families() -> dict[str, Metric]:
        pod = ["namespace", "pod"]
        fams: list[Metric] = [
            CounterMetricFamily(
                "sockops_redirected_bytes", "Bytes moved socket-to-socket by sk_msg, per pod.", labels=pod
            ),
            CounterMetricFamily(
                "sockops_redirected_messages", "sendmsg() calls redirected by sk_msg, per pod.", labels=pod
            ),
            CounterMetricFamily(
                "sockops_redirect_misses",
                "Messages of a paired socket whose peer had left the sockhash: sent over TCP instead.",
                labels=pod,
            ),
            CounterMetricFamily(
                "sockops_pod_sockets_inserted", "Sockets of the pod put into the sockhash.", labels=pod
            ),
            GaugeMetricFamily("sockops_sockets_active", "Sockets in the sockhash now."),
            GaugeMetricFamily("sockops_sockmap_capacity", "Capacity of the sockhash (max entries)."),
            GaugeMetricFamily(
                "sockops_origdst_entries", "Client connections waiting in the original-destination map."
            ),
            GaugeMetricFamily(
                "sockops_origdst_capacity", "Capacity of the original-destination (pending) map."
            ),
            GaugeMetricFamily("sockops_netns_enabled", "Network namespaces enabled in the netns_conf map."),
            GaugeMetricFamily("sockops_netns_capacity", "Capacity of the netns_conf and netns_stats maps."),
            CounterMetricFamily(
                "sockops_socket_insert_failures",
                "Sockets that could not enter the sockhash (connection left on TCP), by reason.",
                labels=["reason"],
            ),
            CounterMetricFamily(
                "sockops_origdst_insert_failures",
                "Client connections not accelerated: original-destination (pending) map full.",
            ),
            CounterMetricFamily(
                "sockops_sockets_not_eligible",
                "Sockets of enabled pods never given a psock by design (left on TCP), by reason.",
                labels=["reason"],
            ),
            CounterMetricFamily("sockops_sockets_inserted", "Sockets put into the sockhash (both ends)."),
            CounterMetricFamily(
                "sockops_sockets_withdrawn", "Unpaired clients removed from the sockhash before any byte."
            ),
            CounterMetricFamily(
                "sockops_connections_paired_cross_pod",
                "Paired connections whose two ends are in two pods of this node (also counted in "
                "sockops_connections_paired by how they paired).",
            ),
            CounterMetricFamily(
                "sockops_early_tcp_sends",
                "Clients whose first bytes left over TCP before their psock existed (a send that "
                "raced the handshake's callback): their sends stay on TCP, never overtaking them.",
            ),
            CounterMetricFamily(
                "sockops_late_sockets",
                "Late insertion (connections established before their pod was enabled): sockets "
                "that joined the sockhash, directions switched to redirect once the receiver had "
                "read every TCP byte, and sockets that left because their peer never joined.",
                labels=["event"],
            ),
            CounterMetricFamily(
                "sockops_halfclose_handoffs",
                "Sockets that sent their FIN before any byte was redirected to them and left the "
                "sockhash to read over TCP (the 6.18 blocking-reader EAGAIN guard).",
            ),
            CounterMetricFamily(
                "sockops_connections_paired",
                "Connections whose two ends were paired: by mirrored tuple or through a capture port.",
                labels=["how"],
            ),
            CounterMetricFamily(
                "sockops_connections_passed",
                "Connections left on TCP at their first message (client spoke before its server joined).",
            ),
            CounterMetricFamily(
                "sockops_pair_races_lost", "Server ends that joined just after their client chose TCP."
            ),
            GaugeMetricFamily(
                "sockops_observed_sockets",
                "TCP sockets of pods in observe mode (sockops.io/accelerate=observe) as of the last "
                "scan, by role (connected|accepted), reader style (nonblocking|blocking) and what "
                "sockops would do (accelerated|plain_tcp|accelerated_exposed).",
                labels=["namespace", "pod", "role", "style", "verdict"],
            ),
            CounterMetricFamily(
                "sockops_app_anomalies",
                "What went wrong in a pod's traffic, counted by the data plane per sending pod, by "
                "kind: queue_over_budget (a peer held more than the queue budget unread: sends "
                "moved to TCP), redirect_miss (the peer was gone: sent over TCP), early_tcp_send.",
                labels=["namespace", "pod", "kind"],
            ),
            GaugeMetricFamily(
                "sockops_breaker_open",
                "1 while the pod's breaker keeps its new connections off acceleration (status "
                "suspended: kind, program and pid in `sockops status`), 0 while it is accelerated.",
                labels=["namespace", "pod"],
            ),
            GaugeMetricFamily("sockops_pods_accelerated", "Workloads accelerated now."),
            GaugeMetricFamily(
                "sockops_pods_pending", "Workloads opted in whose network namespace is not resolved yet."
            ),
            GaugeMetricFamily(
                "sockops_program_attached", "1 if the BPF program is attached, else 0.", labels=["program"]
            ),
            GaugeMetricFamily("sockops_kernel_supported", "1 if the kernel can run sockops, else 0."),
            GaugeMetricFamily("sockops_maps_loaded", "1 if the pinned maps could be opened, else 0."),
            GaugeMetricFamily("sockops_scrape_duration_seconds", "Time this scrape spent reading the maps."),
            CounterMetricFamily(
                "sockops_scrape_errors", "Scrapes in which part of the state could not be read."
            ),
        ]
        return {f.name: f for f in fams}

    # -- collect ------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect_locked()

    def _collect_locked(self) -> Iterator[Metric]:
        start = time.monotonic()
        fams = self._families()
        failed = False

        def safe(what: str, fn: Callable[[], T], default: T) -> T:
            nonlocal failed
            try:
                return fn()
            except Exception:
                failed = True
                log.exception("metrics: reading %s failed", what)
                return default

        sizes = safe("map sizes", self.view.map_sizes, None)
        if sizes is not None:
            fams["sockops_sockmap_capacity"].add_metric([], sizes.sockhash)
            fams["sockops_origdst_capacity"].add_metric([], sizes.pending)
            fams["sockops_netns_capacity"].add_metric([], sizes.netns)
        accelerated = safe("pods accelerated", self.view.pods_accelerated, None)
        if accelerated is not None:
            fams["sockops_pods_accelerated"].add_metric([], accelerated)
        pending = safe("pods pending", self.view.pods_pending, None)
        if pending is not None:
            fams["sockops_pods_pending"].add_metric([], pending)
        attached = safe("attached programs", self.view.programs_attached, None)
        if attached is not None:
            for prog in PROGRAMS:
                fams["sockops_program_attached"].add_metric([prog], 1 if attached.get(prog) else 0)
        supported = safe("kernel support", self.view.kernel_supported, None)
        if supported is not None:
            fams["sockops_kernel_supported"].add_metric([], 1 if supported else 0)

        observed = getattr(self.view, "observed_sockets", None)
        if observed is not None:
            self._add_observed(fams, safe("observed pods", observed, {}))
        breakers = getattr(self.view, "breakers", None)
        if breakers is not None:
            self._add_breakers(fams, safe("breakers", breakers, {}))

        loaded = safe("pinned maps", lambda: self._read_maps(fams, safe), False)
        fams["sockops_maps_loaded"].add_metric([], 1 if loaded else 0)

        if failed:
            self._errors += 1
        fams["sockops_scrape_errors"].add_metric([], self._errors)
        fams["sockops_scrape_duration_seconds"].add_metric([], time.monotonic() - start)
        yield from fams.values()

    def _read_maps(self, fams: dict[str, Metric], safe: Callable[..., object]) -> bool:
        """Fill the map-derived families; False when the data plane is not loaded.

        Map-derived series are left out (not set to 0) when the maps cannot be read: a counter
        that drops to 0 and back looks like a reset and produces a false rate spike.
        """
        with self.view.open_maps() as maps:
            if maps is None:
                return False
            counters = safe("counters", maps.counters, None)
            if counters is not None:
                self._add_counters(fams, counters)
            stats = safe("netns stats", maps.netns_stats, None)
            labels = safe("pod labels", self.view.pod_labels, {})
            if stats is not None:
                self._add_pods(fams, stats, labels)
            anomalies = safe("anomalies", maps.anomalies, None)
            if anomalies is not None:
                self._add_anomalies(fams, anomalies, labels)
            sockets = safe("sockhash", lambda: len(maps.sockets()), None)
            if sockets is not None:
                fams["sockops_sockets_active"].add_metric([], sockets)
            origdst = safe("original-destination map", lambda: len(maps.pending()), None)
            if origdst is not None:
                fams["sockops_origdst_entries"].add_metric([], origdst)
            enabled = safe("netns_conf", lambda: len(maps.enabled()), None)
            if enabled is not None:
                fams["sockops_netns_enabled"].add_metric([], enabled)
            return True

    @staticmethod
    def _add_counters(fams: dict[str, Metric], c: dict[str, int]) -> None:
        for name, reason in INSERT_FAILURE_REASONS.items():
            fams["sockops_socket_insert_failures"].add_metric([reason], c.get(name, 0))
        for name, how in PAIRED_HOW.items():
            fams["sockops_connections_paired"].add_metric([how], c.get(name, 0))
        fams["sockops_origdst_insert_failures"].add_metric([], c.get("pending_full", 0))
        fams["sockops_sockets_inserted"].add_metric([], c.get("sockets_inserted", 0))
        for name, reason in NOT_ELIGIBLE_REASONS.items():
            fams["sockops_sockets_not_eligible"].add_metric([reason], c.get(name, 0))
        # Withdrawn at the first transmit or, for clients that never sent, at their FIN.
        withdrawn = c.get("sockets_withdrawn", 0) + c.get("undecided_fin_left", 0)
        fams["sockops_sockets_withdrawn"].add_metric([], withdrawn)
        fams["sockops_halfclose_handoffs"].add_metric([], c.get("halfclose_left", 0))
        fams["sockops_early_tcp_sends"].add_metric([], c.get("early_tcp_send", 0))
        for name, event in LATE_EVENTS.items():
            fams["sockops_late_sockets"].add_metric([event], c.get(name, 0))
        fams["sockops_connections_paired_cross_pod"].add_metric([], c.get("paired_cross_pod", 0))
        fams["sockops_connections_passed"].add_metric([], c.get("connections_passed", 0))
        fams["sockops_pair_races_lost"].add_metric([], c.get("pair_race_lost", 0))

    def _label_values(self, workload: tuple[str, str]) -> tuple[str, str]:
        namespace, pod = workload
        if self.pod_labels == "namespace":
            return namespace, ""
        if self.pod_labels == "off":
            return UNKNOWN_POD
        return namespace, pod

    def _add_observed(
        self, fams: dict[str, Metric], observed: dict[tuple[str, str], dict[tuple[str, str, str], int]]
    ) -> None:
        """Observed sockets summed by the pod labels the setting keeps (like :meth:`_add_pods`).

        At most 6 (role, style, verdict) combinations exist per pod (sockops/observe.py), and the
        program is never a label, so the series stay bounded by the observed pods.
        """
        per: dict[tuple[str, ...], int] = {}
        for workload, groups in observed.items():
            namespace, pod = self._label_values(workload)
            for (role, style, verdict), n in groups.items():
                key = (namespace, pod, role, style, verdict)
                per[key] = per.get(key, 0) + n
        for key, n in sorted(per.items()):
            fams["sockops_observed_sockets"].add_metric(list(key), n)

    def _add_anomalies(
        self, fams: dict[str, Metric], anomalies: dict[int, Anomalies], labels: dict[int, tuple[str, str]]
    ) -> None:
        """Anomaly counts summed by (namespace, pod) like :meth:`_add_pods`, every kind present."""
        per: dict[tuple[str, str, str], int] = {}
        for cookie, a in anomalies.items():
            namespace, pod = self._label_values(labels.get(cookie, UNKNOWN_POD))
            for kind in layout.ANOMALIES:  # every kind, also one a reader left out
                per[(namespace, pod, kind)] = per.get((namespace, pod, kind), 0) + a.counts.get(kind, 0)
        for key, n in sorted(per.items()):
            fams["sockops_app_anomalies"].add_metric(list(key), n)

    def _add_breakers(self, fams: dict[str, Metric], breakers: dict[tuple[str, str], bool]) -> None:
        """Open breakers by the pod labels the setting keeps: max over the pods summed into one."""
        per: dict[tuple[str, str], int] = {}
        for workload, is_open in breakers.items():
            key = self._label_values(workload)
            per[key] = max(per.get(key, 0), 1 if is_open else 0)
        for key, v in sorted(per.items()):
            fams["sockops_breaker_open"].add_metric(list(key), v)

    def _add_pods(
        self, fams: dict[str, Metric], stats: dict[int, dict[str, int]], labels: dict[int, tuple[str, str]]
    ) -> None:
        """Sum the per-netns stats by (namespace, pod); unknown cookies go to ("", "").

        Summing (rather than one series per cookie) also merges two cookies of one pod, e.g. a
        pod sandbox re-created with a new network namespace while old connections still run,
        and, with fewer labels (``pod_labels``), the pods of a namespace or of the whole node.
        """
        per_pod: dict[tuple[str, str], dict[str, int]] = {}
        for cookie, s in stats.items():
            key = self._label_values(labels.get(cookie, UNKNOWN_POD))
            acc = per_pod.setdefault(key, {})
            for field, value in s.items():
                acc[field] = acc.get(field, 0) + value
        for (namespace, pod), s in sorted(per_pod.items()):
            lv = [namespace, pod]
            fams["sockops_redirected_bytes"].add_metric(lv, s.get("redirected_bytes", 0))
            fams["sockops_redirected_messages"].add_metric(lv, s.get("redirected_msgs", 0))
            fams["sockops_redirect_misses"].add_metric(lv, s.get("misses", 0))
            fams["sockops_pod_sockets_inserted"].add_metric(lv, s.get("sockets_inserted", 0))


def build_registry(view: AgentView, pod_labels: str = "pod") -> tuple[CollectorRegistry, AgentMetrics]:
    """A registry with the agent's metrics, the map collector and the process/Python collectors.

    ``pod_labels`` is SOCKOPS_POD_METRIC_LABELS (see :data:`POD_LABEL_MODES`). Serve the registry
    with ``prometheus_client.generate_latest(registry)`` (or ``make_wsgi_app(registry)``).
    """
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    registry.register(MapCollector(view, pod_labels))
    ProcessCollector(registry=registry)  # agent memory, CPU, open fds
    PlatformCollector(registry=registry)
    return registry, metrics


__all__ = [
    "ENFORCE_LATENCY_BUCKETS",
    "POD_LABEL_MODES",
    "AgentMetrics",
    "AgentView",
    "MapCollector",
    "build_registry",
]
