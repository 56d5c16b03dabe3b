"""The list -> watch -> back off -> stop skeleton both watching sources (Kubernetes, docker) run.

A source that watches something remote follows the same rules whatever it watches: list (the
whole view, reported with ``replace``), then follow the changes; when that fails, wait and try
again, exponentially longer with jitter for trouble that passes by itself (so a thousand agents
do not hammer a recovering API server or engine in step), slowly and with the fix reported for
trouble a retry will not fix; and stop within about a second of ``stop.set()``. What differs is
only how one session lists and watches and how its failures are read, which the source passes in.

The sink is guarded the same way for every source (:class:`GuardedSink`): a sink that raises is
logged, never fatal to the source, and nothing reaches it once the source's ``run`` returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from sockops.sources import Backoff, Sink
from sockops.workload import Workload

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """Why a session ended and how to retry.

    ``permanent``: a retry will not fix it by itself (401/403, a refused request): report it with
    the fix and retry after the slow delay. ``at_once``: retry without waiting (a re-list after
    "410 Gone", once: the next one backs off).
    """

    reason: str
    permanent: bool = False
    at_once: bool = False


def retry_until_stopped(
    stop: threading.Event,
    session: Callable[[], None],
    classify: Callable[[Exception], Failure],
    on_retry: Callable[[Failure, float], None],
    backoff: Backoff,
    slow_delay: Callable[[], float] = lambda: 30.0,
) -> None:
    """Run ``session`` again and again until ``stop`` is set: the one place failures become retries.

    ``session`` lists and/or watches; it returns when its stream ended in a way that needs no wait
    (a watch timeout, a stream that delivered events) or when stopping, and raises on failure,
    which ``classify`` reads. ``on_retry(failure, delay)`` reports a failure before the wait.
    """
    while not stop.is_set():
        try:
            session()
            continue
        except Exception as e:
            if stop.is_set():
                break
            failure = classify(e)
        if stop.is_set():
            break
        if failure.at_once:
            continue
        delay = slow_delay() if failure.permanent else backoff.next()
        on_retry(failure, delay)
        if stop.wait(delay):
            break


class GuardedSink:
    """A source's view of its sink: failures of the sink are logged, and ``close`` cuts it off.

    After ``close()`` (the source's ``run`` returned) every call is dropped: a worker thread still
    blocked in a request when ``run`` gave up on it must not report to a sink that moved on.
    """

    def __init__(self, sink: Sink, source: str) -> None:
        self._sink = sink
        self._source = source
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        if self.closed:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("%s source: the sink raised in %s", self._source, getattr(fn, "__name__", fn))

    def replace(self, source: str, workloads: Iterable[Workload]) -> None:
        self._call(self._sink.replace, source, workloads)

    def upsert(self, workload: Workload) -> None:
        self._call(self._sink.upsert, workload)

    def delete(self, source: str, uid: str) -> None:
        self._call(self._sink.delete, source, uid)

    def error(self, source: str, message: str, fields: Mapping[str, object] | None = None) -> None:
        self._call(self._sink.error, source, message, fields)

    def restarted(self, source: str, reason: str) -> None:
        self._call(self._sink.restarted, source, reason)
