"""Kubernetes Events on the pods the agent accelerates or refuses: what an app team can read.

``kubectl describe pod`` (or ``kubectl get events``) is where an app team looks, and they cannot
exec into the agent; so the agent says there when it starts or stops accelerating a pod, why
an annotation is refused, and why its breaker suspended it (sockops/breaker.py). Events are
written from one background thread through a bounded queue, never from the reconciler's path
(a slow or absent API server must not delay a map write), and rate-limited twice, as
client-go's event correlator does for the same reason (an agent restart or a flapping
annotation must not flood etcd):

* the same (pod, reason, message) is sent once per ``repeat_after`` seconds;
* per pod at most ``burst`` events, refilled at one per ``refill`` seconds.

RBAC: ``create`` on ``events`` only (daemonset/agent/rbac.yaml).
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sockops.breaker import Trip
from sockops.workload import Workload

log = logging.getLogger(__name__)

COMPONENT = "sockops-agent"
STARTED, STOPPED, INVALID = "AccelerationStarted", "AccelerationStopped", "InvalidAnnotation"
SUSPENDED = "AccelerationSuspended"


@dataclass
class _Bucket:
    tokens: float
    at: float


class EventRecorder:
    """Queues Events about pods; :meth:`run` sends them until stopped (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        node: str,
        *,
        repeat_after: float = 600.0,
        burst: int = 5,
        refill: float = 60.0,
        queue_size: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self._api = client.CoreV1Api(api_client)
        self.node = node
        self.repeat_after = repeat_after
        self.burst = burst
        self.refill = refill
        self.clock = clock
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self._sent: dict[tuple[str, str, str], float] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self.dropped = 0

    # -- what the reconciler reports (any thread, never blocks) ---------------------------------
    def started(self, w: Workload, cookie: int) -> None:
        self._pod_event(
            w,
            "Normal",
            STARTED,
            f"sockops accelerates new connections of this pod ({w.reason}) on node {self.node}",
        )

    def stopped(self, w: Workload) -> None:
        self._pod_event(
            w,
            "Normal",
            STOPPED,
            f"sockops no longer accelerates new connections of this pod ({w.reason}); live ones keep running",
        )

    def invalid(self, w: Workload) -> None:
        self._pod_event(w, "Warning", INVALID, "; ".join(w.errors))

    def suspended(self, w: Workload, trip: Trip) -> None:
        self._pod_event(
            w,
            "Warning",
            SUSPENDED,
            f"sockops stopped accelerating new connections of this pod on node {self.node} "
            f"({trip.reason()}); live ones keep running",
        )

    def _allowed(self, uid: str, reason: str, message: str) -> bool:
        now = self.clock()
        with self._lock:
            key = (uid, reason, message)
            last = self._sent.get(key)
            if last is not None and now - last < self.repeat_after:
                return False
            b = self._buckets.setdefault(uid, _Bucket(float(self.burst), now))
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) / self.refill)
            b.at = now
            if b.tokens < 1.0:
                return False
            b.tokens -= 1.0
            self._sent[key] = now
            if len(self._sent) > 10_000:  # forget the oldest half: bounded memory under churn
                for k, _ in sorted(self._sent.items(), key=lambda kv: kv[1])[:5_000]:
                    del self._sent[k]
            return True

    def _pod_event(self, w: Workload, type_: str, reason: str, message: str) -> None:
        if w.source != "kubernetes" or not message:
            return
        message = message[:1024]
        if not self._allowed(w.uid, reason, message):
            self.dropped += 1
            return
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{w.name}.", "namespace": w.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": w.namespace,
                               "name": w.name, "uid": w.uid},
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.node,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }  # fmt: skip
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.dropped += 1

    # -- sending ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Send queued Events until ``stop``; a failure is logged and the Event dropped."""
        from kubernetes.client.exceptions import ApiException

        while not stop.is_set():
            try:
                body = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._api.create_namespaced_event(
                    body["metadata"]["namespace"], body, _preload_content=False, _request_timeout=10
                )
            except ApiException as e:
                self.dropped += 1
                hint = " (RBAC: create on events, daemonset/agent/rbac.yaml)" if e.status == 403 else ""
                log.warning(
                    "cannot write an Event" + hint,
                    extra={"fields": {"status": e.status, "reason": body["reason"]}},
                )
            except Exception as e:
                self.dropped += 1
                log.warning(
                    "cannot write an Event", extra={"fields": {"error": str(e), "reason": body["reason"]}}
                )
