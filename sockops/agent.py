"""The node agent: load or adopt the data plane, run the sources, the reconciler and the HTTP port.

Lifecycle, and why it is safe for traffic:

* start: ``DataPlane.load`` re-opens maps already pinned by an earlier agent (sizes adopted, see
  maps.adopt_sizes) and ``attach`` swaps the programs on the pinned links atomically
  (sockops/links.py), so a restart or an upgrade to changed programs never leaves a moment without
  a program nor attaches twice. Sockets already in the sockhash keep the sk_msg program they were
  inserted with until they close. Other tools' programs on the same cgroup hooks keep running
  (links are multi-attach); the start logs them.
* run: sources report, the reconciler enforces; a source that crashes is restarted with backoff.
* SIGTERM/SIGINT: one stop event ends everything within ``STOP_SECONDS`` whatever the agent is
  doing (loading, running, idle, waiting for the API server, resyncing): a DaemonSet rollout
  replaces one node's agent after the other, so every second here is multiplied by the fleet.
  The work runs in a thread; the main thread only waits for signals and, should the work not
  end in time (a bcc compile cannot be interrupted), exits anyway: programs stay attached and
  maps pinned, so accelerated connections keep running and new connections of enabled pods are
  still accelerated while no agent runs (nothing changes until the next agent reconciles).
* a kernel that cannot run the programs: exit non-zero with the reason, or (``--if-unsupported
  idle``) keep serving health and metrics (``sockops_kernel_supported 0``), report ready (an
  idle node must not block a rollout), and leave nothing behind: maps a failed load pinned into
  an empty bpffs directory are unpinned again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sockops import layout, loader
from sockops.breaker import Breaker
from sockops.config import AgentConfig
from sockops.errors import SockopsError
from sockops.reconciler import ACCELERATED, PENDING, Reconciler, Resolver
from sockops.sources import Backoff, Source

log = logging.getLogger("sockops.agent")

# SIGTERM to exit, at most (tests/test_agent_lifecycle.py). The pod's
# terminationGracePeriodSeconds in daemonset/ is derived from it.
STOP_SECONDS = 1.2


def build_sources(config: AgentConfig) -> list[Source]:
    """The sources named by --source, each constructed from its own flags."""
    out: list[Source] = []
    for name in dict.fromkeys(config.source or ["static"]):
        if name == "static":
            from sockops.sources.static import StaticSource

            out.append(StaticSource(config.netns or []))
        elif name == "kubernetes":
            from sockops.sources.kubernetes import KubernetesSource, load_config, node_name_from_env

            node = config.node_name or node_name_from_env()
            out.append(KubernetesSource(node, api_client=load_config(config.kubeconfig)))
        elif name == "docker":
            from sockops.sources.docker import DockerSource

            out.append(DockerSource(config.docker_host or None))
        else:
            raise SockopsError(f"unknown source {name!r}: use kubernetes, docker or static")
    return out


class _MetricsObserver:
    """Reconciler events -> the agent's own Prometheus metrics."""

    def __init__(self, metrics: Any, sources: list[str], counts: Any = None) -> None:
        self.m = metrics
        self.sources = sources
        self.counts = counts  # () -> {state: workloads}

    def reconcile_error(self, source: str) -> None:
        self.m.reconcile_errors.labels(source=source).inc()

    def watch_restart(self, source: str) -> None:
        self.m.watch_restarts.labels(source=source).inc()

    def enforced(self, seconds: float) -> None:
        self.m.enforce_latency.observe(seconds)

    def reconciled(self) -> None:
        # A pass enforces the union of every source's view, so it counts for each of them.
        for source in self.sources:
            self.m.reconciles.labels(source=source).inc()
        if self.counts is not None:
            for state, n in self.counts().items():
                self.m.workloads.labels(state=state).set(n)
        self.m.last_reconcile.set_to_current_time()


class Agent:
    """Owns the data plane handle, the reconciler and the threads; implements metrics.AgentView."""

    def __init__(self, config: AgentConfig, stop: threading.Event | None = None) -> None:
        from sockops.cgroups import find_cgroup2_root

        self.config = config
        self.stop = stop or threading.Event()
        self.cgroup: Path = config.cgroup or find_cgroup2_root()
        self.bpffs: Path = config.bpffs
        self.sizes = loader.MapSizes(config.sockhash_size, config.pending_size, config.netns_size)
        self.plane: loader.DataPlane | None = None
        self.unsupported: str | None = None
        self.uninstalled = False
        self.reconciler: Reconciler | None = None
        self.started = time.monotonic()
        self.removal: Any = None  # sockops.removal.OwnerWatch with --source kubernetes in a pod
        self.draining = False  # SIGTERM came while the DaemonSet is being deleted: uninstall
        self._decided = threading.Event()  # on_stop() has chosen between stopping and draining
        self._attached_cache: tuple[float, dict[str, bool]] = (0.0, {})

    # -- AgentView (read by the metrics collector at scrape time) ---------------------------------------
    @contextlib.contextmanager
    def open_maps(self) -> Iterator[loader.PinnedMaps | None]:
        if self.plane is None:
            yield None
            return
        try:
            maps = loader.PinnedMaps(self.bpffs)
        except SockopsError:
            yield None
            return
        with maps:
            yield maps

    def pod_labels(self) -> dict[int, tuple[str, str]]:
        return self.reconciler.pod_labels() if self.reconciler else {}

    def breakers(self) -> dict[tuple[str, str], bool]:
        return self.reconciler.breakers() if self.reconciler else {}

    def observed_sockets(self) -> dict[tuple[str, str], dict[tuple[str, str, str], int]]:
        return self.reconciler.observed() if self.reconciler else {}

    def _count(self, state: str) -> int:
        return sum(s.state == state for s in self.reconciler.snapshot()) if self.reconciler else 0

    def pods_accelerated(self) -> int:
        return self._count(ACCELERATED)

    def pods_pending(self) -> int:
        return self._count(PENDING)

    def programs_attached(self) -> dict[str, bool]:
        if self.plane is None:
            return {"sock_ops": False, "sk_msg": False}
        at, cached = self._attached_cache
        if time.monotonic() - at > 2.0:  # probes and scrapes may come close together
            cached = loader.programs_attached(self.cgroup, self.bpffs)
            self._attached_cache = (time.monotonic(), cached)
        return cached

    def kernel_supported(self) -> bool:
        return self.unsupported is None

    def map_sizes(self) -> loader.MapSizes:
        return self.plane.sizes if self.plane else self.sizes

    def status(self) -> dict[str, object]:
        """/status: the agent's own state and every workload's, for `kubectl sockops status`."""
        ready, why = self.ready()
        return {
            "node": self.config.node_name or os.environ.get("NODE_NAME"),
            "ready": ready,
            "agent": why,
            "workloads": [s.to_json() for s in self.reconciler.snapshot()] if self.reconciler else [],
        }

    # -- health ---------------------------------------------------------------------------------------
    def healthy(self) -> tuple[bool, str]:
        rec = self.reconciler
        if self.uninstalled:
            return True, "idle: uninstalled"
        if self.unsupported is not None:
            return True, f"idle: {self.unsupported}"
        if rec is None or rec.last_enforce is None:
            return True, "starting"
        age = time.monotonic() - rec.last_enforce
        limit = 3 * self.config.resync + 30
        if age > limit:
            return False, f"control loop stuck: last enforce {age:.0f} s ago"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        # Idle is a decided, reported state (sockops_kernel_supported 0, this text), not a
        # failure: a not-ready pod counts unavailable and one old node would block every rollout.
        if self.uninstalled:
            return True, "idle: uninstalled (the pinned maps were removed); restart the agent to reinstall"
        if self.unsupported is not None:
            return True, f"idle: {self.unsupported}"
        attached = self.programs_attached()
        if not all(attached.values()):
            return False, f"programs not attached: {attached}"
        rec = self.reconciler
        if rec is None or not rec.synced or not rec.enforced_once:
            return False, "waiting for the first list of every source"
        return True, "ok"

    def stop_budget(self) -> float:
        """Seconds the work may take after SIGTERM before the process exits anyway: a plain stop,
        or the drain of a removal (its drain timeout, the detach and unpin)."""
        return STOP_SECONDS + (self.config.drain_timeout + 5.0 if self.draining else 0.0)

    def on_stop(self) -> None:
        """Called once SIGTERM/SIGINT came: an upgrade stops, a removal drains (sockops.removal)."""
        try:
            if self.removal is not None and self.plane is not None:
                self.draining = self.removal.confirm()
        finally:
            self._decided.set()

    def _start_removal_watch(self) -> None:
        config = self.config
        if "kubernetes" not in (config.source or []) or not (config.pod_name and config.pod_namespace):
            return
        from sockops.removal import OwnerWatch
        from sockops.sources.kubernetes import load_config

        self.removal = OwnerWatch(load_config(config.kubeconfig), config.pod_namespace, config.pod_name)
        threading.Thread(target=self.removal.run, args=(self.stop,), name="daemonset", daemon=True).start()

    def _event_recorder(self) -> Any:
        """Pod Events (sockops.events) with the kubernetes source; None (no Events) otherwise."""
        if "kubernetes" not in (self.config.source or []):
            return None
        from sockops.events import EventRecorder
        from sockops.sources.kubernetes import load_config, node_name_from_env

        node = self.config.node_name or node_name_from_env()
        recorder = EventRecorder(load_config(self.config.kubeconfig), node)
        threading.Thread(target=recorder.run, args=(self.stop,), name="events", daemon=True).start()
        return recorder

    def _drain(self) -> None:
        """What `sockops uninstall` does, without its pause for other agents: this one has stopped."""
        from sockops.cli import uninstall

        log.warning(
            "the DaemonSet is being deleted: draining accelerated connections, then detaching and unpinning",
            extra={"fields": {"bpffs": str(self.bpffs), "drain_timeout_s": self.config.drain_timeout}},
        )
        result = uninstall(self.bpffs, self.cgroup, self.config.drain_timeout, pause=0.0)
        log.info("uninstalled", extra={"fields": result})

    # -- run --------------------------------------------------------------------------------------------
    def load(self) -> None:
        log.info("loading the programs", extra={"fields": {"bpffs": str(self.bpffs)}})
        fresh = not any((self.bpffs / name).exists() for name in layout.ALL_MAPS)
        plane: loader.DataPlane | None = None
        try:
            # Checked before the compile: attaching is what needs it, and a load that fails only
            # at attach has already pinned the maps.
            loader.check_cgroup_v2(self.cgroup)
            plane = loader.DataPlane.load(
                self.bpffs,
                self.sizes,
                queue_budget=self.config.queue_budget,
                proxy_uid=self.config.proxy_uid,
            )
            done = plane.attach(self.cgroup, reader=self.config.reader_hook == "on")
            self.plane = plane
        except SockopsError as e:
            self._abandon(plane, fresh)
            if self.config.if_unsupported != "idle":
                raise
            self.plane = None
            self.unsupported = str(e)
            log.error(
                "not accelerating anything: the data plane cannot run here",
                extra={"fields": {"reason": str(e)}},
            )
            return
        for note in self.plane.notes:
            log.warning(note, extra={"fields": {"bpffs": str(self.bpffs)}})
        log.info(
            "programs attached",
            extra={
                "fields": {
                    "cgroup": str(self.cgroup),
                    "bpffs": str(self.bpffs),
                    "sizes": str(self.plane.sizes),
                    **done,
                }
            },
        )
        self._report_hooks()

    def _late_inserter(self) -> Any:
        """sockops/late.py's pass runner, unless switched off or refused by this kernel."""
        from sockops import late

        if self.config.late_insertion != "on" or self.plane is None:
            return None
        return late.inserter(self.plane)

    def _report_hooks(self) -> None:
        """Say which other programs share our hooks, and whether that is fine."""
        from sockops import links

        try:
            hooks = links.hooks(self.cgroup, self.bpffs)
        except SockopsError as e:
            log.warning("cannot list the programs on the hooks", extra={"fields": {"reason": str(e)}})
            return
        for hook in hooks:
            ok, why = hook.verdict()
            if hook.foreign() or not ok:
                (log.info if ok else log.warning)(
                    "other programs on a hook sockops uses",
                    extra={"fields": {"hook": hook.kind, "target": hook.target, "verdict": why}},
                )

    def _abandon(self, plane: loader.DataPlane | None, fresh: bool) -> None:
        """Undo a load that cannot be used: close its programs and, if the maps were pinned by
        this load into an empty directory, unpin them (pins an earlier agent made stay: their
        connections may still run)."""
        if plane is not None:
            with contextlib.suppress(Exception):
                plane.bpf.cleanup()  # type: ignore[attr-defined]
        if fresh:
            loader.unpin(self.bpffs)

    def _supervise(self, source: Source, work: threading.Event) -> None:
        """Run a source until ``work`` ends; an unexpected crash is logged, counted and restarted."""
        backoff = Backoff(base=1.0)
        while not work.is_set():
            try:
                source.run(self.reconciler, work)  # type: ignore[arg-type]
                return
            except Exception as e:
                log.exception(
                    "source crashed; restarting", extra={"fields": {"source": source.name, "error": str(e)}}
                )
                if self.reconciler:
                    self.reconciler.error(source.name, f"source crashed: {e}")
                if work.wait(backoff.next()):
                    return

    def run(self) -> int:
        from sockops import podresolve
        from sockops.health import HealthServer
        from sockops.metrics import build_registry

        sources = build_sources(self.config)
        self._start_removal_watch()
        self.load()
        if self.stop.is_set():
            return 0
        registry, metrics = build_registry(self, self.config.pod_metric_labels)
        for s in sources:
            metrics.init_source(s.name)  # a first error then shows as an increase from 0
        server = HealthServer(
            self.config.metrics_addr, registry, self.healthy, self.ready, self.status
        ).start()
        log.info(
            "serving /metrics /healthz /readyz",
            extra={"fields": {"addr": f"{server.address[0]}:{server.address[1]}"}},
        )
        try:
            if self.plane is None:
                self.stop.wait()
                return 0
            with self.plane.maps() as maps:
                if maps.clear_uninstall_mark():
                    # An agent starting means the operator wants acceleration: an uninstall that
                    # was interrupted (or races with us) loses its mark; a running one still
                    # detaches and unpins at its end.
                    log.warning("cleared the mark of an unfinished `sockops uninstall`")
                observer = _MetricsObserver(metrics, [s.name for s in sources])
                self.reconciler = Reconciler(
                    maps,
                    Resolver(find_pod=podresolve.find_pod_netns, index_pods=podresolve.index_pods),
                    [s.name for s in sources],
                    observer=observer,
                    state_file=self.config.state_file,
                    notifier=self._event_recorder(),
                    late=self._late_inserter(),
                    breaker=Breaker(self.config.breaker_thresholds, self.config.breaker_cooldown),
                )
                observer.counts = self.reconciler.counts
                work = threading.Event()  # ends sources and reconciler: SIGTERM or an uninstall
                threads = [
                    threading.Thread(
                        target=self._supervise, args=(s, work), name=f"source-{s.name}", daemon=True
                    )
                    for s in sources
                ]
                threads.append(
                    threading.Thread(target=self._watch_pins, args=(maps, work), name="pins", daemon=True)
                )
                for t in threads:
                    t.start()
                try:
                    self.reconciler.run(work, self.config.resync)
                finally:
                    work.set()
                # Sources return within about a second of ``work`` (sockops.sources); one that does
                # not is a daemon thread and does not hold the exit.
                deadline = time.monotonic() + 1.0
                for t in threads:
                    t.join(timeout=max(0.0, deadline - time.monotonic()))
            if self.stop.is_set() and self.removal is not None:
                self._decided.wait(2.0)
                if self.draining:
                    self._drain()
                    return 0
            if not self.stop.is_set():
                # `sockops uninstall` removed the pins: stay up (a DaemonSet would restart an exited
                # agent and load everything again) but accelerate nothing until restarted.
                self.stop.wait()
                return 0
        finally:
            server.close()
        log.info(
            "stopped; programs stay attached and maps pinned, accelerated connections keep running",
            extra={"fields": {"bpffs": str(self.bpffs)}},
        )
        return 0

    def _watch_pins(self, maps: loader.PinnedMaps, work: threading.Event) -> None:
        """End the work when SIGTERM comes or when `sockops uninstall` marks or unpins the maps.

        The mark is read through the agent's own open maps, which still see it after the pins
        are gone.
        """
        pin = self.bpffs / layout.MAP_SOCKHASH
        while not self.stop.wait(1.0):
            if work.is_set():
                return
            if not pin.exists() or maps.uninstalling():
                self.uninstalled = True
                log.warning(
                    "sockops uninstall is removing the maps: idling until restarted",
                    extra={"fields": {"bpffs": str(self.bpffs)}},
                )
                break
        work.set()
        if self.reconciler is not None:
            self.reconciler.wake()  # it may be waiting for the next resync


def run(config: AgentConfig) -> int:
    """Run the agent in a worker thread; the main thread turns SIGTERM/SIGINT into a bounded stop.

    Python runs signal handlers only in the main thread and only between bytecodes, so a main
    thread inside a bcc compile would hear SIGTERM seconds late: it therefore does nothing but wait.
    Once the work has ended the process leaves with ``os._exit``: the interpreter's own shutdown
    spent 1-2 s garbage-collecting (the bcc module, the API client) after the agent had already
    stopped (measured with faulthandler on this VM), and nothing in-process needs finalising: the
    programs and pins are meant to outlive the process, and every log line is flushed first.
    Errors before the work has started (bad settings, no kernel support with ``exit``) are raised
    for the command line to report.
    """
    stop = threading.Event()
    agent = Agent(config, stop)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["rc"] = agent.run()
        except BaseException as e:
            outcome["error"] = e

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = threading.Thread(target=work, name="agent", daemon=True)
    worker.start()
    while worker.is_alive() and not stop.wait(0.5):
        pass
    signalled = time.monotonic()
    agent.on_stop()
    while worker.is_alive() and time.monotonic() - signalled < agent.stop_budget():
        worker.join(0.1)
    if worker.is_alive():
        log.warning(
            "exiting before the work ended; programs stay attached and maps pinned",
            extra={"fields": {"waited_s": round(time.monotonic() - signalled, 2)}},
        )
    elif "error" in outcome:
        raise outcome["error"]
    logging.shutdown()
    sys.stdout.flush()
    os._exit(int(outcome.get("rc", 0)))
