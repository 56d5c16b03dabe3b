"""A local fake of the Kubernetes API for pods and namespaces: list and watch, and their faults.

No API server can be installed here, so the official client is tested against this one. It speaks
what a node agent uses, with the semantics a cache depends on:

* ``GET /api/v1/pods`` (``fieldSelector=spec.nodeName=X`` honoured) and ``GET /api/v1/namespaces``;
* for the agent's own objects and the kubectl plugin: pods of one namespace (``labelSelector``
  equality terms honoured), one pod, the pod proxy to a port a test registered
  (:meth:`proxy_pod`), DaemonSets of a namespace (list, watch with ``metadata.name``, get);
* ``POST /api/v1/namespaces/NS/events``: Events are recorded in :attr:`events`;
* lists carry ``metadata.resourceVersion`` (one global counter, as etcd's revision);
* ``watch=1``: a chunked stream, one JSON event per line, from ``resourceVersion`` on (events
  after it are replayed first), ``timeoutSeconds`` honoured, ``BOOKMARK`` events on request
  when ``allowWatchBookmarks`` was asked for; a pod whose node changes under a field selector
  appears as ADDED / DELETED to that watch, as the real watch cache does;
* a watch from a version older than the compaction point is answered 410 Gone, as an ERROR event
  on a 200 stream (what kube-apiserver does) or, with ``compact(http=True)``, as HTTP 410.

Faults for tests: :meth:`fail_next` (N requests answered 500 or another status),
:meth:`drop_watches` (open streams cut without their final chunk), :meth:`emit_raw` (a malformed
line), :meth:`emit_event` (any object, e.g. a pod without metadata), :meth:`compact`,
:meth:`expire_watches` (410 sent to open watches), :meth:`bookmark`, :meth:`pause` (requests
wait until :meth:`resume`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Event:
    rv: int
    resource: str  # "pods" | "namespaces" | "daemonsets"
    type: str
    obj: Any
    old: Any = None  # the object before a MODIFIED (field-selector transitions)
    raw: bytes | None = None  # sent as is (malformed lines)


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    status: int = 0
    at: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return self.params.get("watch") in ("1", "true", "True")


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def make_pod(
    name: str,
    namespace: str = "default",
    node: str | None = "node-a",
    annotations: dict[str, str] | None = None,
    *,
    uid: str | None = None,
    phase: str = "Running",
    host_network: bool = False,
    containers: tuple[str, ...] = ("app",),
    init_containers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A pod object as the API returns it (the fields sockops reads, plus a few it does not)."""
    spec: dict[str, Any] = {
        "containers": [{"name": c, "image": f"{c}:1"} for c in containers],
        "restartPolicy": "Always",
    }
    if init_containers:
        spec["initContainers"] = [{"name": c, "image": f"{c}:1"} for c in init_containers]
    if node is not None:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4())}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": spec, "status": {"phase": phase}}


class FakeKubeAPI:
    """The fake API server; ``start()`` binds 127.0.0.1 on a free port, ``close()`` stops it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 1
        self.compacted = 0  # a watch from an RV below this gets 410
        self.compact_http = False
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod
        self.namespaces: dict[str, dict[str, Any]] = {}  # name -> namespace
        self.daemonsets: dict[str, dict[str, Any]] = {}  # "ns/name" -> DaemonSet
        self.events: list[dict[str, Any]] = []  # Events POSTed, in order
        self.proxies: dict[tuple[str, str, int], str] = {}  # (ns, pod, port) -> "host:port"
        self.log: list[Event] = []
        self.requests: list[Request] = []
        self._failures: list[tuple[int, str | None]] = []  # (status, resource or None)
        self._drop_gen = 0
        self._expire_gen = 0
        self._bookmark_gen = 0
        self._running = threading.Event()
        self._running.set()
        self._closing = False
        self.open_watches = 0
        self.connections: set[socket.socket] = set()
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeKubeAPI:
        api = self

        class Handler(_Handler):
            fake = api

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The API server is down: every connection is closed and new ones are refused, until
        the block ends and it listens again on the same port."""
        assert self.server is not None
        port = self.server.server_address[1]
        self.server.shutdown()
        self.server.server_close()
        self.drop_watches()
        with self.cond:
            conns = list(self.connections)
        for conn in conns:  # idle keep-alive connections too: a restart closes them all
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        try:
            yield
        finally:
            self.start(port)

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def client(self) -> Any:
        """An official ``kubernetes.client.ApiClient`` pointed at this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.retries = False  # let the source see every failure (urllib3 retries would hide them)
        return client.ApiClient(cfg)

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        self._running.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- objects --------------------------------------------------------------------------------

    def _append(self, resource: str, typ: str, obj: Any, old: Any = None) -> int:
        """Record a change (caller holds cond): a new RV, stamped into the object."""
        self.rv += 1
        if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
            obj["metadata"]["resourceVersion"] = str(self.rv)
        self.log.append(Event(self.rv, resource, typ, copy.deepcopy(obj), copy.deepcopy(old)))
        self.cond.notify_all()
        return self.rv

    def add_pod(self, name: str, namespace: str = "default", node: str | None = "node-a", **kw: Any) -> str:
        """Create a pod (see :func:`make_pod` for the keywords); returns its UID."""
        pod = make_pod(name, namespace, node, **kw)
        with self.cond:
            uid = pod["metadata"]["uid"]
            self.pods[uid] = pod
            self._append("pods", "ADDED", pod)
        return uid

    def update_pod(
        self,
        uid: str,
        mutate: Callable[[dict[str, Any]], None] | None = None,
        *,
        annotations: dict[str, str] | None = None,
        phase: str | None = None,
        node: str | None = None,
        deleting: bool = False,
    ) -> None:
        """Change a pod: new annotations (replacing all), phase, node, deletionTimestamp, or any."""
        with self.cond:
            old = copy.deepcopy(self.pods[uid])
            pod = self.pods[uid]
            if annotations is not None:
                pod["metadata"]["annotations"] = dict(annotations)
            if phase is not None:
                pod["status"]["phase"] = phase
            if node is not None:
                pod["spec"]["nodeName"] = node
            if deleting:
                pod["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
            if mutate is not None:
                mutate(pod)
            self._append("pods", "MODIFIED", pod, old)

    def delete_pod(self, uid: str) -> None:
        with self.cond:
            pod = self.pods.pop(uid)
            self._append("pods", "DELETED", pod)

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        ns = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {"name": name, "uid": str(uuid.uuid4()), "labels": dict(labels or {})},
            "status": {"phase": "Active"},
        }
        with self.cond:
            self.namespaces[name] = ns
            self._append("namespaces", "ADDED", ns)

    def label_namespace(self, name: str, labels: dict[str, str]) -> None:
        """Replace the namespace's labels (creating it when it does not exist)."""
        if name not in self.namespaces:
            self.add_namespace(name, labels)
            return
        with self.cond:
            ns = self.namespaces[name]
            ns["metadata"]["labels"] = dict(labels)
            self._append("namespaces", "MODIFIED", ns)

    def delete_namespace(self, name: str) -> None:
        with self.cond:
            ns = self.namespaces.pop(name)
            self._append("namespaces", "DELETED", ns)

    def add_daemonset(self, name: str, namespace: str) -> str:
        """A DaemonSet (only its metadata matters here); returns its UID."""
        ds = {
            "kind": "DaemonSet",
            "apiVersion": "apps/v1",
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "generation": 1},
            "spec": {},
        }
        with self.cond:
            self.daemonsets[f"{namespace}/{name}"] = ds
            self._append("daemonsets", "ADDED", ds)
        return ds["metadata"]["uid"]

    def delete_daemonset(self, name: str, namespace: str, foreground: bool = False) -> None:
        """Delete it at once (background propagation, kubectl's default), or with ``foreground``
        mark it deleting (deletionTimestamp) while its pods go first."""
        with self.cond:
            key = f"{namespace}/{name}"
            if foreground:
                old = copy.deepcopy(self.daemonsets[key])
                self.daemonsets[key]["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
                self._append("daemonsets", "MODIFIED", self.daemonsets[key], old)
            else:
                self._append("daemonsets", "DELETED", self.daemonsets.pop(key))

    def proxy_pod(self, namespace: str, pod: str, port: int, target: str) -> None:
        """Answer ``pods/POD:PORT/proxy/PATH`` from ``http://target/PATH`` (the pod's real server)."""
        self.proxies[(namespace, pod, port)] = target

    # -- faults ---------------------------------------------------------------------------------

    def emit_event(self, resource: str, typ: str, obj: Any) -> None:
        """Send any event to the watches of ``resource`` without changing the stored objects."""
        with self.cond:
            self._append(resource, typ, obj)

    def emit_raw(self, resource: str, line: bytes) -> None:
        """Send ``line`` (plus a newline) as is to the open watches of ``resource``."""
        with self.cond:
            self.log.append(Event(self.rv, resource, "RAW", None, raw=line))
            self.cond.notify_all()

    def fail_next(self, n: int, status: int = 500, resource: str | None = None) -> None:
        """Answer the next ``n`` requests (of ``resource`` only, if given) with ``status``."""
        with self.cond:
            self._failures.extend([(status, resource)] * n)

    def clear_failures(self) -> None:
        """Forget the failures :meth:`fail_next` has not used yet (the outage is over)."""
        with self.cond:
            self._failures.clear()

    def drop_watches(self) -> None:
        """Cut every open watch stream, without the final chunk (a dropped connection)."""
        with self.cond:
            self._drop_gen += 1
            self.cond.notify_all()

    def compact(self, http: bool = False) -> int:
        """Forget history: watches from a version older than now get 410 Gone."""
        with self.cond:
            self.compacted = self.rv
            self.compact_http = http
            return self.compacted

    def expire_watches(self) -> None:
        """Send a 410 ERROR event to every open watch (a watcher that fell too far behind)."""
        with self.cond:
            self._expire_gen += 1
            self.cond.notify_all()

    def bookmark(self) -> int:
        """Send a BOOKMARK with the current version to watches that asked for bookmarks."""
        with self.cond:
            self._bookmark_gen += 1
            self.cond.notify_all()
            return self.rv

    def pause(self) -> None:
        """Make new requests wait (unanswered) until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    # -- introspection --------------------------------------------------------------------------

    def requests_of(self, resource: str, watch: bool | None = None) -> list[Request]:
        with self.cond:
            return [
                r
                for r in self.requests
                if r.path.rstrip("/").endswith(resource) and (watch is None or r.watch == watch)
            ]

    def wait_watching(self, n: int = 2, timeout: float = 5.0) -> None:
        """Wait until ``n`` watch streams are open (both of a source's loops, by default)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.open_watches < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {self.open_watches} watches open after {timeout}s")
                self.cond.wait(left)

    # -- serving (called from handler threads) --------------------------------------------------

    def _take_failure(self, resource: str) -> int | None:
        with self.cond:
            for i, (status, res) in enumerate(self._failures):
                if res is None or res == resource:
                    del self._failures[i]
                    return status
        return None

    def _matches(self, resource: str, obj: Any, node: Filter) -> bool:
        if not isinstance(obj, dict):
            return True
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        if node.namespace is not None and meta.get("namespace") != node.namespace:
            return False
        if node.name is not None and meta.get("name") != node.name:
            return False
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in node.labels.items()):
            return False
        if resource != "pods" or node.node is None:
            return True
        spec = obj.get("spec")
        return not isinstance(spec, dict) or spec.get("nodeName") == node.node

    def _items(self, resource: str, node: Filter) -> list[Any]:
        store = {"pods": self.pods, "namespaces": self.namespaces, "daemonsets": self.daemonsets}[resource]
        return [copy.deepcopy(o) for o in store.values() if self._matches(resource, o, node)]

    def _translate(self, ev: Event, node: Filter) -> tuple[str, Any] | None:
        """The event as a watch with ``node``'s field selector sees it, or None."""
        now = self._matches(ev.resource, ev.obj, node)
        if ev.type != "MODIFIED" or ev.old is None:
            return (ev.type, ev.obj) if now else None
        before = self._matches(ev.resource, ev.old, node)
        if before and now:
            return ("MODIFIED", ev.obj)
        if now:
            return ("ADDED", ev.obj)
        if before:
            return ("DELETED", ev.obj)
        return None


@dataclass(frozen=True)
class Filter:
    """What a list or watch selects: field selectors spec.nodeName and metadata.name, the
    namespace of the path, labelSelector equality terms."""

    node: str | None = None
    name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def _terms(sel: str | None) -> dict[str, str]:
    out = {}
    for term in (sel or "").split(","):
        key, _, value = term.partition("=")
        if key.strip():
            out[key.strip()] = value.strip().lstrip("=")
    return out


def _filter(params: dict[str, str], namespace: str | None = None) -> Filter:
    fields = _terms(params.get("fieldSelector"))
    return Filter(
        fields.get("spec.nodeName"),
        fields.get("metadata.name"),
        namespace,
        _terms(params.get("labelSelector")),
    )


KINDS = {"pods": "Pod", "namespaces": "Namespace", "daemonsets": "DaemonSet"}
_NAMESPACED = re.compile(
    r"^/(?:api/v1|apis/apps/v1)/namespaces/([^/]+)/(pods|daemonsets)(?:/([^/]+))?(/proxy/.*)?$"
)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKubeAPI
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake.cond:
            self.fake.connections.add(self.connection)

    def finish(self) -> None:
        with self.fake.cond:
            self.fake.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        req = Request("GET", url.path, params)
        with fake.cond:
            fake.requests.append(req)
        fake._running.wait()
        resource = {"/api/v1/pods": "pods", "/api/v1/namespaces": "namespaces"}.get(url.path.rstrip("/"))
        namespace = None
        m = _NAMESPACED.match(url.path.rstrip("/"))
        if m:
            namespace, resource, name, proxy = m.groups()
            if proxy is not None:
                self._proxy(req, namespace, name, proxy[len("/proxy") :])
                return
            if name is not None:
                self._get_one(req, resource, namespace, name)
                return
        if resource is None:
            req.status = 404
            self._send_json(404, status_body(404, "NotFound", f"the fake serves no {url.path}"))
            return
        failure = fake._take_failure(resource)
        if failure is not None:
            req.status = failure
            self._send_json(failure, status_body(failure, "InternalError", "injected failure"))
            return
        node = _filter(params, namespace)
        if req.watch:
            self._watch(req, resource, node, params)
            return
        with fake.cond:
            body = {
                "kind": KINDS[resource] + "List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(fake.rv)},
                "items": fake._items(resource, node),
            }
        req.status = 200
        self._send_json(200, body)

    def _get_one(self, req: Request, resource: str, namespace: str, name: str) -> None:
        fake = self.fake
        with fake.cond:
            if resource == "pods":
                hits = [p for p in fake.pods.values() if p["metadata"]["namespace"] == namespace
                        and p["metadata"]["name"] == name]  # fmt: skip
                obj = copy.deepcopy(hits[0]) if hits else None
            else:
                obj = copy.deepcopy(fake.daemonsets.get(f"{namespace}/{name}"))
        if obj is None:
            req.status = 404
            self._send_json(404, status_body(404, "NotFound", f'{resource} "{name}" not found'))
            return
        req.status = 200
        self._send_json(200, obj)

    def _proxy(self, req: Request, namespace: str, target: str, path: str) -> None:
        """pods/NAME:PORT/proxy/PATH, as the API server forwards it to the pod."""
        import urllib.error
        import urllib.request

        pod, _, port = unquote(target).partition(":")
        upstream = self.fake.proxies.get((namespace, pod, int(port or 80)))
        if upstream is None:
            req.status = 503
            self._send_json(503, status_body(503, "ServiceUnavailable", f"no endpoint for {target}"))
            return
        query = urlsplit(self.path).query
        try:
            with urllib.request.urlopen(
                f"http://{upstream}{path}" + (f"?{query}" if query else ""), timeout=10
            ) as r:
                status, body, ctype = r.status, r.read(), r.headers.get("Content-Type", "text/plain")
        except urllib.error.HTTPError as e:
            status, body, ctype = e.code, e.read(), e.headers.get("Content-Type", "text/plain")
        req.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        fake = self.fake
        url = urlsplit(self.path)
        req = Request("POST", url.path, {})
        with fake.cond:
            fake.requests.append(req)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        m = re.match(r"^/api/v1/namespaces/([^/]+)/events$", url.path.rstrip("/"))
        if not m:
            req.status = 404
            self._send_json(404, status_body(404, "NotFound", f"the fake accepts no POST to {url.path}"))
            return
        failure = fake._take_failure("events")
        if failure is not None:
            req.status = failure
            self._send_json(failure, status_body(failure, "InternalError", "injected failure"))
            return
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", m.group(1))
        if not meta.get("name"):
            meta["name"] = (meta.get("generateName") or "event.") + uuid.uuid4().hex[:10]
        with fake.cond:
            fake.rv += 1
            meta["resourceVersion"] = str(fake.rv)
            meta["uid"] = str(uuid.uuid4())
            fake.events.append(copy.deepcopy(body))
            fake.cond.notify_all()
        req.status = 201
        self._send_json(201, body)

    def _watch(self, req: Request, resource: str, node: Filter, params: dict[str, str]) -> None:
        fake = self.fake
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1", "True")
        timeout = float(params.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        rv_param = params.get("resourceVersion") or ""
        gone = False
        with fake.cond:
            if rv_param in ("", "0"):
                start_rv = fake.rv
                initial = [("ADDED", o) for o in fake._items(resource, node)]
            else:
                start_rv = int(rv_param)
                initial = []
                if start_rv < fake.compacted:
                    gone = True
                    if fake.compact_http:
                        req.status = 410
                        msg = f"too old resource version: {start_rv} ({fake.compacted})"
                        self._send_json(410, status_body(410, "Expired", msg))
                        return
            position = next((i for i, ev in enumerate(fake.log) if ev.rv > start_rv), len(fake.log))
            drop_gen, expire_gen, bookmark_gen = fake._drop_gen, fake._expire_gen, fake._bookmark_gen
            fake.open_watches += 1
            fake.cond.notify_all()
        req.status = 200
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if gone:
                msg = f"too old resource version: {start_rv} ({fake.compacted})"
                self._line({"type": "ERROR", "object": status_body(410, "Expired", msg)})
                self._chunk(b"")
                return
            for typ, obj in initial:
                self._line({"type": typ, "object": obj})
            while True:
                out: list[bytes] = []
                with fake.cond:
                    while (
                        position == len(fake.log)
                        and drop_gen == fake._drop_gen
                        and expire_gen == fake._expire_gen
                        and bookmark_gen == fake._bookmark_gen
                        and not fake._closing
                        and time.monotonic() < deadline
                    ):
                        fake.cond.wait(max(0.0, deadline - time.monotonic()))
                    if drop_gen != fake._drop_gen:
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    for ev in fake.log[position:]:
                        if ev.resource != resource:
                            continue
                        if ev.raw is not None:
                            out.append(ev.raw)
                            continue
                        seen = fake._translate(ev, node)
                        if seen is not None:
                            out.append(json.dumps({"type": seen[0], "object": seen[1]}).encode())
                    position = len(fake.log)
                    if bookmark_gen != fake._bookmark_gen:
                        bookmark_gen = fake._bookmark_gen
                        if bookmarks:
                            obj = {"kind": KINDS[resource], "apiVersion": "v1"}
                            obj["metadata"] = {"resourceVersion": str(fake.rv)}
                            out.append(json.dumps({"type": "BOOKMARK", "object": obj}).encode())
                    expired = expire_gen != fake._expire_gen
                    ended = fake._closing or time.monotonic() >= deadline
                for line in out:
                    self._chunk(line + b"\n")
                if expired:
                    err = {"type": "ERROR", "object": status_body(410, "Expired", "watch expired")}
                    self._line(err)
                    ended = True
                if ended:
                    self._chunk(b"")
                    return
        except OSError:
            self.close_connection = True
        finally:
            with fake.cond:
                fake.open_watches -= 1
                fake.cond.notify_all()

    def _line(self, event: dict[str, Any]) -> None:
        self._chunk(json.dumps(event).encode() + b"\n")
