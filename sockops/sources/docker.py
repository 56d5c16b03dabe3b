"""Docker source: running containers of the local docker engine; a label opts a container in.

``docker run -l sockops.io/accelerate=true ...`` opts a container in (:func:`decide_container`
holds the rule). The source lists the running containers, then follows the engine's container
events (start, die, destroy, update, rename) and reports each container as a :class:`Workload`:

* ``uid`` is the container id, ``name`` its name, ``namespace`` the compose project when the
  container belongs to one (label ``com.docker.compose.project``), else ``docker``;
* ``locator.pid`` is ``State.Pid``: docker knows a process inside the container, so finding the
  network namespace needs no search through /proc;
* a container with ``--network host`` or ``--network container:X`` is reported but never
  accelerated, whatever its label says: the first runs in the host's network namespace (which the
  agent must never enable: every socket of the node would be paired), the second in another
  container's namespace, whose own label decides.

The loop survives the engine going away (a daemon restart, an upgrade of docker): the event
stream ends or the connection is refused, the source backs off (exponential with jitter, capped
at 30 s), reconnects, re-lists and ``replace``s its whole view, then reports ``restarted``. Events
for containers that are gone by the time they are inspected are reported with ``error`` and
skipped. ``run()`` returns within about a second of ``stop.set()``: a watcher thread shuts down the
open event stream's socket, which unblocks the read in ``run()``'s thread.

Events are subscribed to *before* the list is taken, so a container that starts or dies while the
list is read is seen by the event that follows it; handling an event inspects the container
afresh, so seeing a change twice is harmless.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from sockops.sources import Backoff, Sink
from sockops.sources.listwatch import Failure, GuardedSink, retry_until_stopped
from sockops.sources.objects import DOCKER, container_to_workload
from sockops.workload import Workload

log = logging.getLogger(__name__)

SOURCE = DOCKER
EVENTS = ("start", "die", "destroy", "update", "rename")
GONE_EVENTS = frozenset({"die", "destroy"})


class _Restart(Exception):
    """The event stream ended while the source was not stopping: reconnect and re-list."""


class DockerSource:
    """Containers of one docker engine (``base_url``, else ``DOCKER_HOST``, else the default socket)."""

    name = SOURCE

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.backoff = Backoff(base=backoff_base, cap=backoff_cap)
        self._lock = threading.Lock()
        self._stream: Any = None
        self._api: Any = None
        self.connects = 0  # successful (re)lists, for tests and status

    # -- connection -------------------------------------------------------------------------------

    def _connect(self) -> Any:
        """An APIClient; ``version="auto"`` asks the engine, so a dead engine fails here, fast."""
        import docker

        kwargs = docker.utils.kwargs_from_env()
        if self.base_url:
            kwargs["base_url"] = self.base_url
        return docker.APIClient(version="auto", timeout=self.timeout, **kwargs)

    def _abort(self) -> None:
        """Unblock ``run()``: shut the event stream's socket (safe from any thread)."""
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """List, follow events, and reconnect after any failure until ``stop`` is set."""
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if stop.wait(0.2):
                    self._abort()
                    return

        watcher = threading.Thread(target=watch, name="docker-source-stop", daemon=True)
        watcher.start()
        guarded = GuardedSink(sink, SOURCE)
        broken: str | None = None  # why the previous session ended; None before the first

        def classify(e: Exception) -> Failure:
            nonlocal broken
            broken = _describe(e)
            return Failure(broken)

        def on_retry(failure: Failure, delay: float) -> None:
            log.warning("docker source: %s; reconnecting in %.1f s", failure.reason, delay)
            guarded.error(
                self.name,
                f"docker engine unavailable: {failure.reason}; reconnecting in {delay:.1f} s",
                {"attempt": self.backoff.attempts},
            )

        try:
            # A session returns normally only when stopping, which ends the loop.
            retry_until_stopped(
                stop, lambda: self._session(guarded, stop, broken), classify, on_retry, self.backoff
            )
        finally:
            guarded.close()
            done.set()
            self._abort()
            with contextlib.suppress(Exception):
                if self._api is not None:
                    self._api.close()
            self._api = None
            watcher.join(timeout=2)

    def _session(self, sink: Sink, stop: threading.Event, broken: str | None) -> None:
        """One connection: subscribe, list, replace, then handle events until the stream ends."""
        if self._api is not None:
            with contextlib.suppress(Exception):
                self._api.close()
        api = self._api = self._connect()
        stream = api.events(decode=True, filters={"type": "container", "event": list(EVENTS)})
        with self._lock:
            self._stream = stream
        if stop.is_set():  # stop came while connecting: the watcher may have missed this stream
            self._abort()
            return
        workloads = list(self._list(api))
        sink.replace(self.name, workloads)
        self.connects += 1
        if broken is not None:
            sink.restarted(self.name, f"reconnected after: {broken}")
        self.backoff.reset()
        for event in _iterate(stream):
            if stop.is_set():
                return
            self.handle_event(api, event, sink)
        if stop.is_set():
            return
        raise _Restart("the event stream ended (docker engine stopped or restarted?)")

    def _list(self, api: Any) -> Iterator[Workload]:
        """Every running container, inspected (the list alone carries no PID)."""
        import docker

        for summary in api.containers(filters={"status": "running"}):
            try:
                info = api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue  # gone between list and inspect: its destroy event follows
            w = container_to_workload(info)
            if w is not None:
                yield w

    def handle_event(self, api: Any, event: Mapping[str, Any], sink: Sink) -> None:
        """Apply one container event: re-inspect on start/update/rename, delete on die/destroy."""
        import docker

        if event.get("Type", "container") != "container":
            return
        action = str(event.get("Action") or event.get("status") or "")
        cid = str(event.get("id") or (event.get("Actor") or {}).get("ID") or "")
        if not cid:
            sink.error(self.name, f"container event without an id: {dict(event)!r:.200}")
            return
        if action in GONE_EVENTS:
            sink.delete(self.name, cid)
            return
        try:
            info = api.inspect_container(cid)
        except docker.errors.NotFound:
            name = (event.get("Actor") or {}).get("Attributes", {}).get("name", "")
            sink.error(
                self.name,
                f"container {cid[:12]}{f' ({name})' if name else ''} from a {action!r} event no longer "
                f"exists (removed before it could be inspected); ignored",
                {"uid": cid, "event": action},
            )
            return
        w = container_to_workload(info)
        if w is None:
            sink.delete(self.name, cid)
        else:
            sink.upsert(w)


def _iterate(stream: Any) -> Iterator[Mapping[str, Any]]:
    """The stream's events; a read error (the socket shut by ``_abort``) ends it like EOF."""
    try:
        yield from stream
    except (OSError, ValueError) as e:
        log.debug("docker event stream: %s", e)


def _describe(e: BaseException) -> str:
    """A one-line reason for the logs and ``restarted``: connection refused, stream ended, ..."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, _Restart):
        return text
    if "Connection refused" in text or "No such file or directory" in text:
        return f"cannot connect to the docker engine ({text[:200]})"
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
