"""A Sink for source tests: keeps the view a source reported and every call, with bounded waits.

Calls are recorded as ``(what, arg)``: ``("replace", [workloads])``, ``("upsert", workload)``,
``("delete", uid)``, ``("error", message)``, ``("restarted", reason)``. A wait that runs out
fails with the view and the last calls, so a test says what the source did instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sockops.workload import Workload


class RecordingSink:
    def __init__(self, source: str | None = None, timeout: float = 10.0) -> None:
        self.source = source  # when set, every call must come from this source
        self.timeout = timeout  # default for the waits
        self.cond = threading.Condition()
        self.view: dict[str, Workload] = {}
        self.calls: list[tuple[str, Any]] = []
        self.errors: list[tuple[str, dict[str, object]]] = []
        self.restarts: list[str] = []

    def _record(self, source: str, what: str, arg: Any) -> None:
        assert self.source is None or source == self.source, (source, self.source)
        self.calls.append((what, arg))
        self.cond.notify_all()

    # -- the Sink contract ---------------------------------------------------------------------------
    def replace(self, source: str, workloads: Iterable[Workload]) -> None:
        with self.cond:
            ws = list(workloads)
            assert self.source is None or all(w.source == self.source for w in ws)
            self.view = {w.uid: w for w in ws}
            self._record(source, "replace", ws)

    def upsert(self, workload: Workload) -> None:
        with self.cond:
            self.view[workload.uid] = workload
            self._record(workload.source, "upsert", workload)

    def delete(self, source: str, uid: str) -> None:
        with self.cond:
            self.view.pop(uid, None)
            self._record(source, "delete", uid)

    def error(self, source: str, message: str, fields: Mapping[str, object] | None = None) -> None:
        with self.cond:
            self.errors.append((message, dict(fields or {})))
            self._record(source, "error", message)

    def restarted(self, source: str, reason: str) -> None:
        with self.cond:
            self.restarts.append(reason)
            self._record(source, "restarted", reason)

    # -- views ---------------------------------------------------------------------------------------
    @property
    def replaces(self) -> int:
        return self.count("replace")

    def count(self, what: str) -> int:
        with self.cond:
            return sum(1 for c in self.calls if c[0] == what)

    def messages(self, what: str) -> list[Any]:
        with self.cond:
            return [a for c, a in self.calls if c == what]

    def by_name(self) -> dict[str, Workload]:
        with self.cond:
            return {f"{w.namespace}/{w.name}": w for w in self.view.values()}

    def accelerated(self) -> set[str]:
        return {k for k, w in self.by_name().items() if w.accelerate}

    # -- waits ---------------------------------------------------------------------------------------
    def wait_for(
        self, pred: Callable[[RecordingSink], bool], what: str = "", timeout: float | None = None
    ) -> None:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:.0f} s waiting for {what or pred}: "
                        f"view={sorted(self.by_name())} restarts={self.restarts} errors={self.errors} "
                        f"last calls={self.calls[-10:]}"
                    )
                self.cond.wait(min(left, 0.1))

    def wait_view(self, expected: dict[str, bool], timeout: float | None = None) -> None:
        """Wait until the view is exactly ``expected`` (namespace/name -> accelerate)."""

        def ok(s: RecordingSink) -> bool:
            return {k: w.accelerate for k, w in s.by_name().items()} == expected

        self.wait_for(ok, f"view == {expected}", timeout)

    def wait_workload(
        self, uid: str, pred: Callable[[Workload], bool] = lambda w: True, timeout: float | None = None
    ) -> Workload:
        self.wait_for(lambda s: uid in s.view and pred(s.view[uid]), f"{uid[:12]} in the view", timeout)
        with self.cond:
            return self.view[uid]

    def wait_gone(self, uid: str, timeout: float | None = None) -> None:
        self.wait_for(lambda s: uid not in s.view, f"{uid[:12]} gone from the view", timeout)
