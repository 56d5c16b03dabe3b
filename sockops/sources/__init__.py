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

import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``base * 2**n`` capped, times a random factor in [0.5, 1].

    The jitter spreads the reconnects of every agent of a cluster after an API server or engine
    restart; the lower bound of 0.5 keeps the growth visible (and testable).
    """

    base: float = 0.5
    cap: float = 30.0
    attempts: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempts = 0
