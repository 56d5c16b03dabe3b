"""The one place desired state becomes BPF map state.

Sources report workloads (see sockops.sources); the reconciler keeps the union of their views,
resolves each opted-in workload to its network namespace cookie, and makes the ``netns_conf`` map
hold exactly the namespaces that should be accelerated. It is idempotent: ``enforce()`` computes
the target from scratch and writes only differences, so a periodic resync repairs any drift (an
entry removed or changed by hand comes back; one the agent no longer wants goes).

Why only ``netns_conf``: it is read by sock_ops when a connection is established, so changing it
affects new connections only. Sockets already in the sockhash stay there with their peers until
they close; removing a live socket from its last map would purge its unread data (docs/DATAPLANE.md
F4). Disabling a pod is therefore always safe for its live connections.

A pod whose traffic goes wrong (sockops/breaker.py) is taken out of ``netns_conf`` like a pod
that opted out, and reported ``suspended`` with the reason until its breaker resets; the
anomaly counts are read at every pass, and the loop wakes every ``breaker_poll`` seconds while
any pod is accelerated or suspended.

A workload in observe mode is resolved like an accelerated one but never enabled: its status is
``observing`` with a report of its programs' sockets (sockops/observe.py), read at first sight and
at every full resync, not at every event (a /proc scan per event would cost the churn path).

Entries the agent writes carry NETNS_F_AGENT; entries made by hand (``sockops enable``) do not,
and the reconciler never removes them. Until every source has completed its first list, the
reconciler adds but never removes: a restarted agent must not switch a node's pods off for the
moment before its sources have caught up.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sockops import netns as netns_mod
from sockops import observe
from sockops.breaker import Breaker, Trip
from sockops.errors import NetnsNotFound, SockopsError
from sockops.layout import NetnsSettings, SockKey
from sockops.maps import Anomalies
from sockops.workload import Locator, Workload

log = logging.getLogger("sockops.reconciler")

ACCELERATED = "accelerated"
PENDING = "pending"  # opted in, namespace not resolved yet (retried)
OFF = "off"
ERROR = "error"  # opted in, but the map write failed (retried)
OBSERVING = "observing"  # observe mode: resolved and reported, never enabled
SUSPENDED = "suspended"  # opted in, but its breaker tripped (sockops/breaker.py): not enabled
STATES = (ACCELERATED, PENDING, OFF, ERROR, OBSERVING, SUSPENDED)

Scanner = Callable[[Mapping[tuple[str, str], Path]], Mapping[tuple[str, str], observe.Report]]


@dataclass(frozen=True)
class WorkloadStatus:
    """What the agent did with one workload, and why: what `sockops status` shows."""

    workload: Workload
    state: str
    reason: str
    cookie: int | None = None
    netns: str | None = None
    capture: str | None = None  # Istio's capture found in the pod: "iptables-legacy 15001/15006"
    observed: observe.Report | None = None  # observe mode: what its programs' sockets would get
    breaker: Trip | None = None  # suspended: why

    def to_json(self) -> dict[str, object]:
        w = self.workload
        return {
            "source": w.source,
            "uid": w.uid,
            "namespace": w.namespace,
            "name": w.name,
            "state": self.state,
            "reason": self.reason,
            "cookie": self.cookie,
            "netns": self.netns,
            "capture": self.capture,
            "errors": list(w.errors),
            "observed": self.observed.to_json() if self.observed is not None else None,
            "breaker": self.breaker.to_json() if self.breaker is not None else None,
        }


class MapWriter(Protocol):
    """The part of maps.PinnedMaps the reconciler needs (tests may pass a fake)."""

    def enable(self, cookie: int, settings: NetnsSettings, sync: bool = True) -> None: ...

    def disable(self, cookie: int, sync: bool = True) -> bool: ...

    def enabled(self) -> dict[int, NetnsSettings]: ...

    def sync_node_pods(
        self, current: dict[str, int] | None = None, enabled: dict[int, NetnsSettings] | None = None
    ) -> dict[str, int]: ...

    def netns_stats(self) -> dict[int, dict[str, int]]: ...

    def sockets(self) -> list[SockKey]: ...

    def forget(self, cookie: int) -> None: ...

    def anomalies(self) -> dict[int, Anomalies]: ...

    def watch(self, cookie: int) -> None: ...

    def unwatch(self, cookie: int) -> None: ...


class Observer(Protocol):
    """Where the reconciler reports for metrics (sockops.metrics.AgentMetrics fits)."""

    def reconcile_error(self, source: str) -> None: ...

    def watch_restart(self, source: str) -> None: ...

    def enforced(self, seconds: float) -> None: ...

    def reconciled(self) -> None: ...


class LatePass(Protocol):
    """Late insertion (sockops/late.py): lets connections that predate an enable join."""

    def run(self, namespaces: Mapping[int, Path], node_pods: Mapping[str, int]) -> object: ...


class Notifier(Protocol):
    """Where the reconciler tells a workload's owner what happened (sockops.events: pod Events)."""

    def started(self, w: Workload, cookie: int) -> None: ...

    def stopped(self, w: Workload) -> None: ...

    def invalid(self, w: Workload) -> None: ...

    def suspended(self, w: Workload, trip: Trip) -> None: ...


class _NullNotifier:
    def started(self, w: Workload, cookie: int) -> None:
        pass

    def stopped(self, w: Workload) -> None:
        pass

    def invalid(self, w: Workload) -> None:
        pass

    def suspended(self, w: Workload, trip: Trip) -> None:
        pass


class _NullObserver:
    def reconcile_error(self, source: str) -> None:
        pass

    def watch_restart(self, source: str) -> None:
        pass

    def enforced(self, seconds: float) -> None:
        pass

    def reconciled(self) -> None:
        pass


# -- resolution ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    path: Path
    cookie: int
    settings: NetnsSettings
    capture: str | None = None  # "<backend> <out>/<in>" when Istio's capture rules were found


# A namespace read (nsenter iptables-save, addresses) is trusted without re-reading once it found
# everything it looks for, or once the namespace is this old: istio-init writes the nat rules and
# the CNI the addresses within seconds of the sandbox, and never again for its life.
SETTLE_SECONDS = 120.0


@dataclass(frozen=True)
class _Read:
    inputs: tuple[object, ...]  # what the workload said that the read depends on
    settings: NetnsSettings
    capture: str | None
    first_seen: float
    complete: bool


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class Resolver:
    """Locator -> network namespace, cookie and settings.

    The host's own namespace is refused whatever a source says: enabling it would put the node's
    own sockets (and every host-network pod's) in the sockhash.

    What is read from inside a namespace (Istio's capture with ``nsenter iptables-save``, the pod's
    addresses) is cached per netns cookie: a full resync used to fork two programs per pod every
    30 s, most of the agent's steady-state CPU (bench/steady.py, README "Resources"). An entry
    is read again when the workload's own inputs change (its sidecar hint or Istio annotations),
    until it has settled (:data:`SETTLE_SECONDS`), and is dropped when its namespace is no longer
    wanted (:meth:`retain`; a cookie is never reused while the system runs).
    """

    def __init__(
        self,
        find_pod: Callable[[str], Path | None] | None = None,
        index_pods: Callable[[Iterable[str]], dict[str, Path]] | None = None,
        settings_for: Callable[[Path, bool | None], NetnsSettings] | None = None,
        host_netns: Path = Path("/proc/self/ns/net"),
        read_capture: Callable[[Path], netns_mod.Capture | None] = netns_mod.istio_capture,
        clock: Callable[[], float] = time.monotonic,
        settle: float = SETTLE_SECONDS,
    ) -> None:
        self._find_pod = find_pod
        self._index_pods = index_pods
        self._index: dict[str, Path] = {}
        self._settings_for = settings_for
        self._read_capture = read_capture
        self.host_netns = host_netns
        self.clock = clock
        self.settle = settle
        self._cache: dict[int, _Read] = {}
        self.reads = 0  # namespaces read from inside (tests, benchmark)

    def path(self, loc: Locator) -> Path:
        if loc.pid is not None:
            path = Path(f"/proc/{loc.pid}/ns/net")
            if not path.exists():
                raise NetnsNotFound(
                    f"process {loc.pid} is gone; waiting for the runtime to report the new one"
                )
        elif loc.netns is not None:
            path = netns_mod.resolve(loc.netns)
        elif loc.pod_uid is not None:
            found = self._index.get(loc.pod_uid)
            if found is None and self._find_pod:
                found = self._find_pod(loc.pod_uid)
            if found is None:
                raise NetnsNotFound(
                    f"no process of pod {loc.pod_uid} found yet (looked for its UID in /proc/*/cgroup: "
                    f"is /proc the host's, i.e. hostPID or a /proc hostPath mount?)"
                )
            path = found
        else:
            raise NetnsNotFound("the source gave no way to find this workload's network namespace")
        if _same_file(path, self.host_netns):
            raise NetnsNotFound("it uses the host's network namespace (host network): never accelerated")
        return path

    def prefetch(self, pod_uids: Iterable[str]) -> None:
        """Find many pods in one pass over /proc (a resync of hundreds of pods is one scan)."""
        uids = list(pod_uids)
        self._index = self._index_pods(uids) if self._index_pods and uids else {}

    def _read(self, path: Path, cookie: int, w: Workload) -> _Read:
        inputs = (w.sidecar, w.capture)
        now = self.clock()
        hit = self._cache.get(cookie)
        if hit is not None and hit.inputs == inputs and (hit.complete or now - hit.first_seen >= self.settle):
            return hit
        self.reads += 1
        if self._settings_for is not None:
            settings, capture = self._settings_for(path, w.sidecar), None
        else:
            found = self._read_capture(path)
            settings = netns_mod.settings_from(path, w.sidecar, found)
            capture = f"{found.backend} {found.out_port}/{found.in_port}" if found else None
        read = _Read(
            inputs,
            settings,
            capture,
            first_seen=hit.first_seen if hit is not None else now,
            complete=capture is not None and bool(settings.local_ips),
        )
        self._cache[cookie] = read
        return read

    def retain(self, cookies: Set[int]) -> None:
        """Forget what was read from namespaces other than ``cookies`` (gone or not wanted)."""
        for cookie in [c for c in self._cache if c not in cookies]:
            del self._cache[cookie]

    def resolve(self, w: Workload) -> Resolved:
        path = self.path(w.locator)
        cookie = netns_mod.cookie(path)
        read = self._read(path, cookie, w)
        settings = read.settings
        if settings.sidecar and not w.capture.outbound_captured:
            # The pod's annotations switch outbound capture off: no app connection ever reaches
            # the sidecar's outbound port, so only plain same-pod pairing is worth doing.
            settings = replace(settings, sidecar=False)
        return Resolved(path, cookie, replace(settings, managed=True), read.capture)


# -- the reconciler ----------------------------------------------------------------------------------


@dataclass
class _Event:
    kind: str  # replace | upsert | delete | error | restarted | wake
    source: str
    seen: float
    workloads: tuple[Workload, ...] = ()
    uid: str = ""
    message: str = ""
    fields: Mapping[str, object] = field(default_factory=dict)


class Reconciler:
    """Implements sockops.sources.Sink; ``run()`` applies events and enforces until stopped."""

    def __init__(
        self,
        maps: MapWriter,
        resolver: Resolver,
        sources: Iterable[str],
        observer: Observer | None = None,
        state_file: Path | None = None,
        retry: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        scanner: Scanner = observe.scan,
        late: LatePass | None = None,
        breaker: Breaker | None = None,
        breaker_poll: float = 1.0,
    ) -> None:
        self.maps = maps
        self.late = late
        self.breaker = breaker or Breaker(clock=clock)
        self.breaker_poll = breaker_poll
        self.scanner = scanner
        self.notifier: Notifier = notifier or _NullNotifier()
        self.resolver = resolver
        self.expected_sources = set(sources)
        self.observer: Observer = observer or _NullObserver()
        self.state_file = state_file
        self.retry = retry
        self.clock = clock
        self._events: queue.Queue[_Event] = queue.Queue()
        self._lock = threading.Lock()
        self._desired: dict[tuple[str, str], Workload] = {}
        self._synced: set[str] = set()
        self._resolved: dict[tuple[str, str], Resolved] = {}
        self._status: dict[tuple[str, str], WorkloadStatus] = {}
        self._observed: dict[tuple[str, str], tuple[int, observe.Report]] = {}  # key -> (cookie, report)
        self._last_state: str | None = None
        self._written: dict[int, NetnsSettings] | None = None  # what netns_conf holds, as last read
        self._node_pods: dict[str, int] | None = None  # what node_pods holds
        self._late_waiting = False  # the last late pass left directions whose reader was behind
        self.enforced_once = False
        self.last_enforce: float | None = None

    # -- Sink (called from source threads) ----------------------------------------------------------
    def replace(self, source: str, workloads: Iterable[Workload]) -> None:
        self._events.put(_Event("replace", source, self.clock(), workloads=tuple(workloads)))

    def upsert(self, workload: Workload) -> None:
        self._events.put(_Event("upsert", workload.source, self.clock(), workloads=(workload,)))

    def delete(self, source: str, uid: str) -> None:
        self._events.put(_Event("delete", source, self.clock(), uid=uid))

    def error(self, source: str, message: str, fields: Mapping[str, object] | None = None) -> None:
        self._events.put(_Event("error", source, self.clock(), message=message, fields=dict(fields or {})))

    def restarted(self, source: str, reason: str) -> None:
        self._events.put(_Event("restarted", source, self.clock(), message=reason))

    def wake(self) -> None:
        """End the wait for the next event or resync now (the agent is stopping)."""
        self._events.put(_Event("wake", "", self.clock()))

    # -- views (any thread) -----------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        """Every source has delivered its first complete list (readiness)."""
        with self._lock:
            return self.expected_sources <= self._synced

    def snapshot(self) -> list[WorkloadStatus]:
        with self._lock:
            return sorted(self._status.values(), key=lambda s: (s.workload.namespace, s.workload.name))

    def counts(self) -> dict[str, int]:
        """Workloads per state, every state present (the sockops_workloads gauge)."""
        out = dict.fromkeys(STATES, 0)
        for s in self.snapshot():
            out[s.state] = out.get(s.state, 0) + 1
        return out

    def pod_labels(self) -> dict[int, tuple[str, str]]:
        """netns cookie -> (namespace, pod) of accelerated (or suspended) workloads, for per-pod
        metrics: a suspended pod's live connections still count, and so do its anomalies."""
        return {
            s.cookie: (s.workload.namespace, s.workload.name)
            for s in self.snapshot()
            if s.state in (ACCELERATED, SUSPENDED) and s.cookie is not None
        }

    def breakers(self) -> dict[tuple[str, str], bool]:
        """(namespace, pod) -> breaker open, for every accelerated or suspended workload."""
        return {
            (s.workload.namespace, s.workload.name): s.state == SUSPENDED
            for s in self.snapshot()
            if s.state in (ACCELERATED, SUSPENDED)
        }

    def observed(self) -> dict[tuple[str, str], dict[tuple[str, str, str], int]]:
        """(namespace, pod) -> sockets by (role, style, verdict) of observed workloads (metrics)."""
        out: dict[tuple[str, str], dict[tuple[str, str, str], int]] = {}
        for s in self.snapshot():
            if s.state == OBSERVING and s.observed is not None:
                acc = out.setdefault((s.workload.namespace, s.workload.name), {})
                for group, n in s.observed.totals().items():
                    acc[group] = acc.get(group, 0) + n
        return out

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, stop: threading.Event, resync: float = 30.0) -> None:
        """Apply events as they come and enforce after each batch; full resync every ``resync`` s.

        A workload that could not be resolved is retried every ``retry`` seconds, so a pod seen
        before its sandbox exists is accelerated as soon as it does.
        """
        next_resync = self.clock()
        while not stop.is_set():
            now = self.clock()
            full = now >= next_resync
            batch = self._drain(timeout=0 if full else self._wait_time(next_resync))
            if stop.is_set():
                break
            self.step(batch, full=full)
            if full:
                next_resync = self.clock() + resync

    def _wait_time(self, next_resync: float) -> float:
        until_resync = max(0.0, next_resync - self.clock())
        if self._unresolved():
            until_resync = min(until_resync, self.retry)
        if self._guarded():
            until_resync = min(until_resync, self.breaker_poll)
        return until_resync

    def _unresolved(self) -> bool:
        """Something to retry before the next resync: a workload not resolved yet, or a late
        pass that left a direction waiting for its reader to catch up."""
        if self._late_waiting:
            return True
        with self._lock:
            return any(s.state in (PENDING, ERROR) for s in self._status.values())

    def _guarded(self) -> bool:
        """Some pod's breaker may trip or reset: its anomalies are read at every pass."""
        with self._lock:
            return any(s.state in (ACCELERATED, SUSPENDED) for s in self._status.values())

    def _drain(self, timeout: float) -> list[_Event]:
        batch: list[_Event] = []
        try:
            batch.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
        except queue.Empty:
            return batch
        while True:
            try:
                batch.append(self._events.get_nowait())
            except queue.Empty:
                return batch

    def step(self, batch: list[_Event], full: bool = False) -> None:
        """Apply a batch of events, then enforce. ``full`` re-resolves every workload."""
        for ev in batch:
            self._apply(ev)
        try:
            self.enforce(full=full)
        except SockopsError as e:
            self.observer.reconcile_error("reconciler")
            log.error("enforcing map state failed", extra={"fields": {"error": str(e)}})
            return
        self.observer.reconciled()
        now = self.clock()
        for ev in batch:
            if ev.kind in ("replace", "upsert", "delete"):
                self.observer.enforced(now - ev.seen)

    def _apply(self, ev: _Event) -> None:
        with self._lock:
            if ev.kind == "replace":
                for key in [k for k in self._desired if k[0] == ev.source]:
                    del self._desired[key]
                for w in ev.workloads:
                    self._desired[w.key] = w
                if ev.source not in self._synced:
                    log.info(
                        "source synced",
                        extra={"fields": {"source": ev.source, "workloads": len(ev.workloads)}},
                    )
                self._synced.add(ev.source)
            elif ev.kind == "upsert":
                self._desired[ev.workloads[0].key] = ev.workloads[0]
            elif ev.kind == "delete":
                self._desired.pop((ev.source, ev.uid), None)
        if ev.kind in ("replace", "upsert"):
            for w in ev.workloads:
                for err in w.errors:
                    self.observer.reconcile_error(w.source)
                    log.warning(err, extra={"fields": w.log_fields()})
                if w.errors:
                    self.notifier.invalid(w)
        elif ev.kind == "error":
            self.observer.reconcile_error(ev.source)
            log.warning(ev.message, extra={"fields": {"source": ev.source, **ev.fields}})
        elif ev.kind == "restarted":
            self.observer.watch_restart(ev.source)
            log.info("watch restarted", extra={"fields": {"source": ev.source, "reason": ev.message}})

    def enforce(self, full: bool = False) -> None:
        """Make netns_conf hold exactly the managed entries desired now. Idempotent."""
        with self._lock:
            desired = dict(self._desired)
            synced = self.expected_sources <= self._synced
        statuses: dict[tuple[str, str], WorkloadStatus] = {}
        target: dict[int, NetnsSettings] = {}
        paths: dict[int, Path] = {}
        owners: dict[int, list[tuple[str, str]]] = {}
        self.resolver.prefetch(
            w.locator.pod_uid
            for key, w in desired.items()
            if (w.accelerate or w.observe) and w.locator.pod_uid and (full or key not in self._resolved)
        )
        to_scan: dict[tuple[str, str], Path] = {}
        anomalies = self._anomalies()
        for key, w in desired.items():
            if not w.accelerate:
                self.breaker.forget(key)  # opting out (and in again) resets the breaker
            if not w.accelerate and not w.observe:
                statuses[key] = WorkloadStatus(w, OFF, w.reason)
                self._resolved.pop(key, None)
                continue
            res = None if full else self._resolved.get(key)
            if res is None:
                try:
                    res = self.resolver.resolve(w)
                except (SockopsError, OSError) as e:
                    self._resolved.pop(key, None)
                    prev = self._status.get(key)
                    if prev is None or prev.state != PENDING or prev.reason != str(e):
                        log.warning(
                            "not accelerated yet", extra={"fields": {**w.log_fields(), "reason": str(e)}}
                        )
                    statuses[key] = WorkloadStatus(w, PENDING, str(e))
                    continue
                self._resolved[key] = res
            if not w.accelerate:
                # Observe mode: resolved (so the report names the right namespace) but never a
                # map entry. Scanned at first sight, when its namespace changed, and every resync.
                seen = self._observed.get(key)
                if full or seen is None or seen[0] != res.cookie:
                    to_scan[key] = res.path
                statuses[key] = WorkloadStatus(w, OBSERVING, w.reason, res.cookie, str(res.path), res.capture)
                continue
            if anomalies is None:  # unreadable this pass: nothing trips or resets
                trip, tripped = self.breaker.open_trip(key), False
            else:
                trip, tripped = self.breaker.check(key, res.cookie, w.reset, anomalies.get(res.cookie))
            if trip is not None:
                statuses[key] = WorkloadStatus(
                    w, SUSPENDED, trip.reason(), res.cookie, str(res.path), res.capture, breaker=trip
                )
                if tripped:
                    self.notifier.suspended(w, trip)
                    log.warning(
                        "acceleration suspended for new connections; live ones keep running",
                        extra={"fields": {**w.log_fields(), "cookie": res.cookie, **trip.to_json()}},
                    )
                continue
            # Two workloads in one namespace (a pod seen by two sources, containers sharing a
            # sandbox) enable it once; the first one's settings win, in a stable order.
            target.setdefault(res.cookie, res.settings)
            paths.setdefault(res.cookie, res.path)
            owners.setdefault(res.cookie, []).append(key)
            statuses[key] = WorkloadStatus(w, ACCELERATED, w.reason, res.cookie, str(res.path), res.capture)
        for key in [k for k in self._resolved if k not in desired]:
            del self._resolved[key]
        self.breaker.retain(desired.keys())
        self._observe(to_scan, statuses, anomalies)
        if full:
            self.resolver.retain({r.cookie for r in self._resolved.values()})

        # The map is read back on every full resync (drift repair); between resyncs the
        # reconciler trusts what it wrote, so an event costs map writes only, not a map walk.
        if full or self._written is None:
            self._written = self.maps.enabled()
            self._node_pods = None
        current = self._written
        changed = False
        for cookie, settings in target.items():
            if current.get(cookie) == settings:
                continue
            try:
                self.maps.enable(cookie, settings, sync=False)
                current[cookie] = settings
                changed = True
            except SockopsError as e:
                for key in owners[cookie]:
                    w = desired[key]
                    self.observer.reconcile_error(w.source)
                    log.error("enabling failed", extra={"fields": {**w.log_fields(), "error": str(e)}})
                    statuses[key] = WorkloadStatus(w, ERROR, f"writing the map failed: {e}", cookie)
                continue
            for key in owners[cookie]:
                self.notifier.started(desired[key], cookie)
                log.info(
                    "accelerated",
                    extra={
                        "fields": {
                            **desired[key].log_fields(),
                            "netns": statuses[key].netns,
                            "cookie": cookie,
                        }
                    },
                )
        if synced:
            for cookie, settings in list(current.items()):
                if settings.managed and cookie not in target:
                    self.maps.disable(cookie, sync=False)
                    del current[cookie]
                    changed = True
                    log.info("acceleration off for new connections", extra={"fields": {"cookie": cookie}})
        with self._lock:
            for key, st in statuses.items():
                prev = self._status.get(key)
                if prev and prev.state == ACCELERATED and st.state in (OFF, OBSERVING):
                    self.notifier.stopped(st.workload)
                    log.info(
                        "acceleration off for new connections; live ones keep running",
                        extra={"fields": {**st.workload.log_fields(), "cookie": prev.cookie}},
                    )
            self._status = statuses
        if changed or self._node_pods is None:
            # Pod IPs of the node for cross-pod pairing, derived from what netns_conf holds.
            self._node_pods = self.maps.sync_node_pods(self._node_pods, current)
        if full and synced:
            # A suspended pod keeps its counters: it comes back (reset) with the same namespace.
            held = {st.cookie for st in statuses.values() if st.state == SUSPENDED and st.cookie}
            self._forget_gone(current.keys() | target.keys() | held)
        if self.late is not None and paths and (changed or full or self._late_waiting):
            self._late_pass({c: p for c, p in paths.items() if c in current})
        # Readiness: true once an enforce has run on every source's complete view.
        self.enforced_once = self.enforced_once or synced
        self.last_enforce = self.clock()
        self._write_state()

    def _late_pass(self, paths: Mapping[int, Path]) -> None:
        """Connections of the enabled namespaces that predate their enable join now; a direction
        whose receiver is still behind switches at a later pass (every ``retry`` seconds while
        some wait, else every resync). Never fatal: a failed pass leaves those connections on
        TCP, where they were."""
        assert self.late is not None
        self._late_waiting = False
        try:
            result = self.late.run(paths, self._node_pods or {})
        except Exception as e:  # whatever it is, the loop that enables pods goes on
            log.warning("late insertion pass failed", extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
            return
        self._late_waiting = bool(getattr(result, "waiting", 0))
        for failure in getattr(result, "failed", ()):
            log.info("late insertion skipped a namespace", extra={"fields": {"reason": failure}})

    def _anomalies(self) -> dict[int, Anomalies] | None:
        """The anomaly counts of every namespace; None when they cannot be read (logged): the
        breakers then keep their state for this pass, as a missing count must not look like 0."""
        try:
            return self.maps.anomalies()
        except (SockopsError, OSError) as e:
            log.warning("cannot read the anomaly counts", extra={"fields": {"error": str(e)}})
            return None

    def _observe(
        self,
        to_scan: Mapping[tuple[str, str], Path],
        statuses: dict[tuple[str, str], WorkloadStatus],
        anomalies: Mapping[int, Anomalies] | None,
    ) -> None:
        """Scan the observed workloads that need it and attach every observed one's report.

        The scanner never raises by contract; should it anyway, the workloads keep their last
        report (or none): observe mode must not stop the loop that enables other pods.
        """
        if to_scan:
            try:
                reports = dict(self.scanner(to_scan))
            except Exception as e:
                log.exception("observing failed", extra={"fields": {"error": str(e)}})
                reports = {}
            for key, report in reports.items():
                st = statuses.get(key)
                if st is None or key not in to_scan:
                    continue
                if key not in self._observed:
                    log.info(
                        "observing: not accelerated, sockets reported",
                        extra={
                            "fields": {**st.workload.log_fields(), "netns": st.netns, "cookie": st.cookie}
                        },
                    )
                self._observed[key] = (st.cookie or 0, report)
        for key in list(self._observed):
            st = statuses.get(key)
            if st is None or st.state != OBSERVING:
                cookie, _ = self._observed.pop(key)
                self._watch(cookie, False)
        for key in to_scan:  # first sight, a new namespace, every resync: enough to repair drift
            st = statuses.get(key)
            if st is not None and st.state == OBSERVING:
                self._watch(st.cookie or 0, True)
        splices = self._splices({cookie for cookie, _ in self._observed.values()}, anomalies)
        for key, (cookie, report) in self._observed.items():
            found = splices.get(cookie)
            statuses[key] = replace(
                statuses[key], observed=replace(report, splice=found) if found else report
            )

    def _watch(self, cookie: int, on: bool) -> None:
        """Let the reader hook count an observed namespace's splices (an anomaly entry without
        enabling it), or stop when it is no longer observed. Never fatal to the loop."""
        if not cookie:
            return
        try:
            if on:
                self.maps.watch(cookie)
            else:
                self.maps.unwatch(cookie)
        except SockopsError as e:
            log.warning(
                "cannot watch an observed namespace", extra={"fields": {"cookie": cookie, "error": str(e)}}
            )

    def _splices(
        self, cookies: Set[int], anomalies: Mapping[int, Anomalies] | None
    ) -> dict[int, tuple[int, str, int]]:
        """What the reader hook saw in each observed namespace: (calls, program, pid of the last),
        from the anomaly counts this pass already read (None: unreadable, nothing reported)."""
        found: dict[int, tuple[int, str, int]] = {}
        if anomalies is None:
            return found
        for cookie in cookies:
            a = anomalies.get(cookie)
            if a is not None and a.counts.get("splice_reader"):
                pid, comm = a.last.get("splice_reader", (0, ""))
                found[cookie] = (a.counts["splice_reader"], comm, pid)
        return found

    def _forget_gone(self, wanted: Set[int]) -> None:
        """Drop per-namespace counters nobody can use any more: not enabled, no socket left.

        Keeps the stats map bounded under pod churn; counters of a namespace whose accelerated
        connections still run stay until the last one closes. ``wanted``: the namespaces netns_conf
        holds or should hold after this pass (which has just read and written it).
        """
        live = {k.netns for k in self.maps.sockets()}
        for cookie in self.maps.netns_stats():
            if cookie not in wanted and cookie not in live:
                self.maps.forget(cookie)

    def _write_state(self) -> None:
        """Publish the statuses for `sockops status` (atomic rename; only when they changed)."""
        if self.state_file is None:
            return
        doc = json.dumps({"workloads": [s.to_json() for s in self.snapshot()]}, indent=1)
        if doc == self._last_state:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + f".{os.getpid()}.tmp")
            tmp.write_text(doc)
            tmp.replace(self.state_file)
            self._last_state = doc
        except OSError as e:
            log.warning(
                "cannot write the state file",
                extra={"fields": {"path": str(self.state_file), "error": str(e)}},
            )


def read_state(path: Path) -> list[dict[str, Any]] | None:
    """The workloads an agent published, or None when no agent wrote the file."""
    try:
        return json.loads(path.read_text())["workloads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
