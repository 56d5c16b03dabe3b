"""The per-pod breaker: a pod whose traffic goes wrong stops getting new acceleration.

The data plane counts what goes wrong per sending network namespace (struct netns_anomalies:
a count per kind, and the pid and comm of the last process that hit each). The reconciler asks
the breaker, at every pass, whether a pod's counts rose past its kind's threshold since the
breaker first saw the pod; when one did, the breaker *trips*: the reconciler disables the pod's
namespace (new connections only; live ones keep running, docs/DATAPLANE.md) and reports the pod
``suspended`` with the kind, program and pid, until a reset:

* the pod's reset annotation ``sockops.io/breaker-reset`` (docker: the label) takes a new
  value, or its opt-in is switched off and on again;
* or the cool-down (``--breaker-cooldown`` seconds; 0: only the annotation resets) has passed.

A reset takes a new baseline, so only anomalies after it count. So does the first sight of a
pod: counts that predate the agent (a restart) or the pod's acceleration never trip.

Thresholds, per kind (``--breaker-thresholds``, ``kind=N``; 0 never trips):

* ``splice_reader`` = 1: a program splice()d from a socket while redirected bytes waited in its
  psock queue (bpf/reader.bpf.c): it had read that connection with recv() past its grace, then
  switched to splice(), which never reads the psock queue, so that connection waits for bytes it
  will not see. The one I/O style the reader gate cannot foresee (docs/DATAPLANE.md, "The reader
  gate"); a splice reader from the start is simply kept on TCP and never counted.
* ``queue_over_budget`` = 0: a receiver held more than the queue budget unread. The data plane
  already moved that connection to TCP (flow control holds the sender again), and ordinary large
  transfers do it (a reader slower than one big write: measured through Envoy with 8 MiB
  requests), so by default it is counted, not tripped; ``queue_over_budget=1`` suspends a pod at
  its first slow reader.
* ``redirect_miss`` = 0: a miss happens whenever a peer closes while its partner still sends
  (a normal race, handled by sending over TCP), so its count grows with traffic, not with a
  fault: no count separates a broken pod from a busy one.
* ``early_tcp_send`` = 0: handled (the connection stays on TCP), and caused by an app's timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sockops.layout import ANOMALIES
from sockops.workload import RESET_ANNOTATION

if TYPE_CHECKING:  # the kubectl plugin renders trips without the map code
    from sockops.maps import Anomalies

KINDS = tuple(ANOMALIES)
DEFAULT_THRESHOLDS: dict[str, int] = {
    "queue_over_budget": 0,
    "redirect_miss": 0,
    "early_tcp_send": 0,
    "splice_reader": 1,
}

Key = tuple[str, str]  # Workload.key


class InvalidThresholds(ValueError):
    """A --breaker-thresholds value sockops cannot use; the message says what would be valid."""


def parse_thresholds(value: str) -> dict[str, int]:
    """``kind=N,kind=N`` over the defaults; raises InvalidThresholds with the valid kinds."""
    out = dict(DEFAULT_THRESHOLDS)
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        kind, sep, n = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS or not n.strip().isdigit():
            raise InvalidThresholds(
                f"{part!r} is not kind=N with N >= 0 (0: never trips); kinds: {', '.join(KINDS)}"
            )
        out[kind] = int(n)
    return out


@dataclass(frozen=True)
class Trip:
    """Why a pod's breaker is open: what went wrong, who sent, and what resets it."""

    kind: str
    pid: int
    comm: str
    count: int  # anomalies of this kind since the baseline
    at: float  # the breaker's clock when it tripped
    reset: str  # the pod's reset annotation then; a new value resets

    def reason(self) -> str:
        return (
            f"{self.kind}: program {self.comm or '?'} (pid {self.pid}) hit it {self.count} time(s); "
            f"new connections are not accelerated until {RESET_ANNOTATION} changes or the cool-down ends"
        )

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "pid": self.pid, "comm": self.comm, "count": self.count}


def render(trip: Mapping[str, object]) -> str:
    """A suspended workload's breaker (Trip.to_json()) and how to reset it, for status output."""
    return (
        f"breaker: {trip['kind']} by {trip['comm']} (pid {trip['pid']}), {trip['count']} time(s); "
        f"reset: kubectl annotate pod NAME {RESET_ANNOTATION}=$(date +%s) --overwrite"
    )


@dataclass(frozen=True)
class _Baseline:
    cookie: int
    counts: Mapping[str, int]


class Breaker:
    """Per-workload trip state; the reconciler calls :meth:`check` for every opted-in workload."""

    def __init__(
        self,
        thresholds: Mapping[str, int] | None = None,
        cooldown: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        self.cooldown = cooldown
        self.clock = clock
        self._base: dict[Key, _Baseline] = {}
        self._trips: dict[Key, Trip] = {}
        self.resets = 0  # tests, logs

    def check(self, key: Key, cookie: int, reset: str, seen: Anomalies | None) -> tuple[Trip | None, bool]:
        """The open trip of this workload (None: closed), and whether it tripped just now.

        ``seen``: its namespace's anomalies as the map holds them now (None: no entry yet, which
        counts as zero: the entry is created when the namespace is enabled)."""
        counts = dict(seen.counts) if seen is not None else dict.fromkeys(KINDS, 0)
        trip = self._trips.get(key)
        if trip is not None:
            expired = self.cooldown > 0 and self.clock() - trip.at >= self.cooldown
            if trip.reset == reset and not expired:
                return trip, False
            del self._trips[key]
            self._base[key] = _Baseline(cookie, counts)
            self.resets += 1
            return None, False
        base = self._base.get(key)
        if base is None or base.cookie != cookie:
            self._base[key] = _Baseline(cookie, counts)  # first sight: what predates us never trips
            return None, False
        for kind in KINDS:
            limit = self.thresholds.get(kind, 0)
            rise = counts.get(kind, 0) - base.counts.get(kind, 0)
            if limit > 0 and rise >= limit:
                pid, comm = seen.last.get(kind, (0, "")) if seen is not None else (0, "")
                trip = Trip(kind, pid, comm, rise, self.clock(), reset)
                self._trips[key] = trip
                return trip, True
        return None, False

    def open_trip(self, key: Key) -> Trip | None:
        return self._trips.get(key)

    def forget(self, key: Key) -> None:
        """The workload is off (or gone): its trip and baseline go; opting in again starts anew."""
        self._trips.pop(key, None)
        self._base.pop(key, None)

    def retain(self, keys: Set[Key]) -> None:
        for key in [k for k in self._base.keys() | self._trips.keys() if k not in keys]:
            self.forget(key)
