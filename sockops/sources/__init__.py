"""Sources of desired state: each watches one part of the world and reports workloads to a sink.

A source never touches BPF maps. It reports what it sees to a :class:`Sink` (the reconciler) and
keeps itself alive: a source's ``run`` returns only when ``stop`` is set, and handles lost
connections, re-lists and backoff itself. The contract with the sink:

* ``replace(source, workloads)`` after every complete (re-)list: the source's whole view; anything
  of this source not in it is gone. The first ``replace`` of a source marks it synced (readiness).
* ``upsert(workload)`` / ``delete(source, uid)`` for changes seen between lists;
* ``error(source, message, fields)`` for a problem the user should see (counted, logged), e.g. an
  object that cannot be parsed; the source carries on;
* ``restarted(source, reason)`` each time a watch is re-established (counted: a loop shows).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Protocol

from sockops.workload import Workload


class Sink(Protocol):
    def replace(self, source: str, workloads: Iterable[Workload]) -> None: ...

    def upsert(self, workload: Workload) -> None: ...

    def delete(self, source: str, uid: str) -> None: ...

    def error(self, source: str, message: str, fields: Mapping[str, object] | None = None) -> None: ...

    def restarted(self, source: str, reason: str) -> None: ...


class Source(Protocol):
    name: str

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Report to ``sink`` until ``stop`` is set; never raises for temporary trouble."""
        ...
