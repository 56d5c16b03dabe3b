"""Kubernetes source: the pods of this node and the namespaces that set their defaults.

Two list+watch loops (pods with ``spec.nodeName=<node>``, all namespaces) feed one in-memory view;
every change of a pod, or of the label of its namespace, becomes an ``upsert``/``delete`` on the
sink, every complete pod list a ``replace``. The loops follow the API's rules for a cache that
never misses a change:

* list, then watch from the list's resourceVersion (with bookmarks, which advance it while
  nothing changes on this node, so that a reconnect after a quiet hour does not need a re-list);
* a dropped stream or an API error re-watches from the last resourceVersion after an exponential
  backoff with jitter (so a thousand agents do not hammer a recovering API server in step);
  "410 Gone" (the version was compacted away) re-lists and replaces the whole view;
* nothing the API server sends can stop the loop: an unreadable line or object is reported to the
  sink and skipped; 401/403 are reported with the fix and retried slowly (the agent fails open:
  acceleration already set up keeps running while the RBAC is repaired).

Objects are read as plain JSON (``_preload_content=False``) rather than through the client's
models: the models turn a single malformed pod into an exception for the whole list, and watch
lines must be parsed one by one to survive a bad one.

``run()`` returns within about a second of ``stop.set()``, even in the middle of a watch: the
loops run in worker threads and the open responses' sockets are shut down from ``run()``'s thread;
after ``run()`` returns the sink is never called again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sockops.errors import KubeConfigMissing, NodeNameMissing
from sockops.sources import Backoff, Sink
from sockops.sources.listwatch import Failure, GuardedSink, retry_until_stopped
from sockops.sources.objects import (
    KUBERNETES,
    Malformed,
    PodReading,
    _resource_name,
    _resource_version,
    namespace_of,
    pod_identity,
    read_pod,
)
from sockops.workload import Workload

log = logging.getLogger(__name__)

SOURCE = KUBERNETES
# One watch line is one object; a pod is a few KiB, a line this long means a broken stream.
MAX_LINE_BYTES = 8 * 1024 * 1024
RBAC_FIX = (
    "the ServiceAccount lacks get/list/watch on {what}: apply daemonset/rbac "
    "(a ClusterRole with get, list, watch on pods and namespaces, bound to the agent's ServiceAccount)"
)
NODE_ENV = ("SOCKOPS_NODE_NAME", "NODE_NAME")


# -- configuration -------------------------------------------------------------------------------


def load_config(kubeconfig: str | os.PathLike[str] | None = None, context: str | None = None) -> Any:
    """An ``ApiClient`` for this environment: in-cluster in a pod, else the kubeconfig.

    In-cluster is chosen when ``KUBERNETES_SERVICE_HOST`` is set and no kubeconfig was named
    (that is how the kubelet tells a container where its API server is). Otherwise the kubeconfig
    is ``kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``; either may be a ``:``-separated
    list, merged as kubectl does (``--kubeconfig`` often comes from ``$KUBECONFIG``).
    Raises :class:`KubeConfigMissing` with what to do.
    """
    if kubeconfig is not None and not str(kubeconfig):
        kubeconfig = None
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)
        except ConfigException as e:
            raise KubeConfigMissing(
                f"in-cluster Kubernetes config is unusable ({e}): the pod needs its ServiceAccount token "
                "(automountServiceAccountToken: true in daemonset/), or pass --kubeconfig"
            ) from e
        return client.ApiClient(cfg)
    if kubeconfig is not None:
        paths = [p for p in str(kubeconfig).split(os.pathsep) if p]
    elif os.environ.get("KUBECONFIG"):
        paths = [p for p in os.environ["KUBECONFIG"].split(os.pathsep) if p]
    else:
        paths = ["~/.kube/config"]
    existing = [p for p in paths if Path(p).expanduser().is_file()]
    if not existing:
        raise KubeConfigMissing(
            f"no Kubernetes config: not in a pod (KUBERNETES_SERVICE_HOST unset) and no kubeconfig at "
            f"{', '.join(paths)}; run the agent as the DaemonSet in daemonset/, or pass --kubeconfig FILE "
            "(or set KUBECONFIG)"
        )
    try:
        return config.new_client_from_config(config_file=os.pathsep.join(existing), context=context)
    except (ConfigException, OSError, ValueError) as e:
        raise KubeConfigMissing(
            f"kubeconfig {', '.join(existing)} is unusable ({e}): check it with kubectl --kubeconfig, "
            "or pass another with --kubeconfig"
        ) from e


def node_name_from_env(environ: Mapping[str, str] | None = None) -> str:
    """The node this agent runs on, from ``SOCKOPS_NODE_NAME`` or ``NODE_NAME``.

    There is no fallback to the hostname: on many clouds the node name differs from it, and a
    wrong name would silently select no pods at all.
    """
    environ = os.environ if environ is None else environ
    for var in NODE_ENV:
        if environ.get(var, "").strip():
            return environ[var].strip()
    raise NodeNameMissing(
        "the node name is unknown: set NODE_NAME from the downward API in the DaemonSet "
        "(env: [{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]) or pass --node-name"
    )


# -- the source ----------------------------------------------------------------------------------


class _Gone(Exception):
    """The watch's resourceVersion was compacted away (410): only a re-list can continue."""


class _StreamBroken(Exception):
    """The watch stream cannot be continued (ERROR event, unframed data); re-watch from the RV."""


class KubernetesSource:
    """Pods of one node, with namespace defaults, as desired state (see the module docstring).

    ``api_client``: a ``kubernetes.client.ApiClient``; by default :func:`load_config` (so a
    missing config fails at construction, before the agent reports ready). ``backoff_base`` and
    ``backoff_cap``: reconnects after temporary errors; ``auth_backoff``: the (slow) retry after
    401/403 and other errors a retry will not fix by itself. ``watch_timeout``: seconds the API
    server keeps one watch open (it is then re-established from its resourceVersion, which costs
    one request and is not counted as a restart). ``request_timeout``: connect and read timeout
    of lists; a watch may be silent for ``watch_timeout`` plus this. ``namespace_wait``: how long
    the first pod list waits for the first namespace list (so that pods of a labelled namespace
    are not reported unaccelerated for a moment at startup).
    """

    name = SOURCE

    def __init__(
        self,
        node_name: str,
        api_client: Any = None,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        auth_backoff: float = 30.0,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        namespace_wait: float = 10.0,
    ) -> None:
        if not node_name or not isinstance(node_name, str):
            raise NodeNameMissing("KubernetesSource needs the node name (NODE_NAME)")
        from kubernetes import client

        self.node_name = node_name
        self.api_client = api_client if api_client is not None else load_config()
        self._api = client.CoreV1Api(self.api_client)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.auth_backoff = auth_backoff
        self.watch_timeout = max(1, int(watch_timeout))
        self.request_timeout = request_timeout
        self.namespace_wait = namespace_wait

        self._lock = threading.RLock()  # the view below, and every call to the sink
        self._sink: GuardedSink | None = None
        # uid -> (namespace, last pod object seen, not gone)
        self._pods: dict[str, tuple[str, dict[str, Any]]] = {}
        self._namespaces: dict[str, dict[str, str]] = {}  # name -> labels
        self._emitted: dict[str, Workload] = {}  # uid -> what the sink was last told
        self._pods_synced = False
        self._ns_synced = threading.Event()
        self._responses: set[Any] = set()
        self._resource_versions: dict[str, str | None] = {"pods": None, "namespaces": None}

    # -- public ---------------------------------------------------------------------------------

    @property
    def resource_versions(self) -> dict[str, str | None]:
        """The last resourceVersion of each watch (for tests and ``status``)."""
        with self._lock:
            return dict(self._resource_versions)

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Report to ``sink`` until ``stop`` is set; returns within about a second of it."""
        with self._lock:
            self._sink = GuardedSink(sink, SOURCE)
        workers = [
            threading.Thread(target=self._loop, args=(kind, stop), name=f"sockops-k8s-{kind}", daemon=True)
            for kind in ("namespaces", "pods")
        ]
        for w in workers:
            w.start()
        try:
            while not stop.wait(0.5):
                if not any(w.is_alive() for w in workers):  # only on a bug: the loops catch all
                    log.error("kubernetes source: watch loops ended unexpectedly")
                    stop.wait()
        finally:
            self._abort_responses()
            deadline = time.monotonic() + 1.0
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()))
            # A worker still blocked in a request (an API server that accepted the connection
            # and never answered) finishes on its timeout; it must not call the sink after this.
            guarded = self._sink
            assert guarded is not None
            if self._lock.acquire(timeout=0.5):
                guarded.close()
                self._lock.release()
            else:
                guarded.close()

    # -- sink calls -----------------------------------------------------------------------------

    def _error(self, message: str, **fields: object) -> None:
        log.warning("kubernetes source: %s %s", message, fields or "")
        with self._lock:
            if self._sink is not None:
                self._sink.error(SOURCE, message, dict(fields))

    def _restarted(self, reason: str) -> None:
        log.info("kubernetes source: watch re-established after: %s", reason)
        with self._lock:
            if self._sink is not None:
                self._sink.restarted(SOURCE, reason)

    # -- the view (callers hold self._lock) -----------------------------------------------------

    def _set_pod(self, pod: dict[str, Any]) -> None:
        self._apply(read_pod(pod, self._namespaces.get), pod)

    def _apply(self, r: PodReading, pod: dict[str, Any]) -> None:
        if r.workload is None or (r.node is not None and r.node != self.node_name):
            self._forget_pod(r.uid)
            return
        self._pods[r.uid] = (r.namespace, pod)
        if r.problem is not None:
            self._error(r.problem, kind="pod", namespace=r.namespace, pod=r.name, uid=r.uid)
        if self._emitted.get(r.uid) != r.workload:
            self._emitted[r.uid] = r.workload
            assert self._sink is not None
            self._sink.upsert(r.workload)

    def _forget_pod(self, uid: str) -> None:
        self._pods.pop(uid, None)
        if self._emitted.pop(uid, None) is not None:
            assert self._sink is not None
            self._sink.delete(SOURCE, uid)

    def _reevaluate(self, namespace: str | None = None) -> None:
        """Re-decide the pods of ``namespace`` (all when None) after its labels changed."""
        if not self._pods_synced:
            return  # the first pod list decides with whatever namespaces are known by then
        for pod_namespace, pod in list(self._pods.values()):
            if namespace is None or pod_namespace == namespace:
                self._set_pod(pod)

    def _replace_pods(self, items: list[Any]) -> None:
        pods: dict[str, tuple[str, dict[str, Any]]] = {}
        workloads: dict[str, Workload] = {}
        for item in items:
            try:
                r = read_pod(item, self._namespaces.get)
            except Malformed as e:
                self._error(f"skipped a pod in the list: {e}", kind="pod")
                continue
            if r.workload is None or (r.node is not None and r.node != self.node_name):
                continue
            if r.problem is not None:
                self._error(r.problem, kind="pod", namespace=r.namespace, pod=r.name, uid=r.uid)
            pods[r.uid], workloads[r.uid] = (r.namespace, item), r.workload
        self._pods, self._emitted, self._pods_synced = pods, workloads, True
        assert self._sink is not None
        self._sink.replace(SOURCE, list(workloads.values()))

    def _set_namespace(self, obj: Any, deleted: bool = False) -> None:
        try:
            name, labels = namespace_of(obj)
        except Malformed as e:
            name = _resource_name(obj)
            if name is None:
                self._error(f"skipped a namespace: {e}", kind="namespace")
                return
            self._error(f"{e}; treating the namespace as unlabelled", kind="namespace", namespace=name)
            labels = {}
        old = self._namespaces.get(name)
        if deleted:
            self._namespaces.pop(name, None)
            labels = {}
        else:
            self._namespaces[name] = labels
        if (old or {}) != labels:
            self._reevaluate(name)

    def _replace_namespaces(self, items: list[Any]) -> None:
        old = self._namespaces
        self._namespaces = {}
        for item in items:
            try:
                name, labels = namespace_of(item)
            except Malformed as e:
                name = _resource_name(item)
                self._error(f"skipped a namespace in the list: {e}", kind="namespace")
                if name is None:
                    continue
                labels = {}
            self._namespaces[name] = labels
        for name in set(old) | set(self._namespaces):
            if old.get(name, {}) != self._namespaces.get(name, {}):
                self._reevaluate(name)

    # -- list and watch -------------------------------------------------------------------------

    def _call(self, kind: str, **kwargs: Any) -> Any:
        """One raw list or watch request (urllib3 response; non-2xx raises ApiException, 410 _Gone)."""
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "pods":
                return self._api.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={self.node_name}", _preload_content=False, **kwargs
                )
            return self._api.list_namespace(_preload_content=False, **kwargs)
        except ApiException as e:
            if e.status == 410:
                raise _Gone(f"410 Gone for the {kind} watch") from e
            raise

    def _track(self, resp: Any, stop: threading.Event) -> None:
        with self._lock:
            self._responses.add(resp)
        if stop.is_set():
            self._abort_responses()

    def _untrack(self, resp: Any) -> None:
        with self._lock:
            self._responses.discard(resp)
        with contextlib.suppress(Exception):
            resp.release_conn()
        with contextlib.suppress(Exception):
            resp.close()

    def _abort_responses(self) -> None:
        """Shut down the sockets of open responses: a blocked read returns at once."""
        with self._lock:
            responses = list(self._responses)
        for resp in responses:
            try:
                resp.shutdown()  # urllib3 >= 2.3
            except Exception:
                with contextlib.suppress(Exception):
                    resp.close()

    def _list(self, kind: str, stop: threading.Event) -> str:
        """List ``kind`` and replace the view with it; returns the list's resourceVersion."""
        resp = self._call(kind, _request_timeout=(self.request_timeout, self.request_timeout))
        self._track(resp, stop)
        try:
            body = resp.data
        finally:
            self._untrack(resp)
        if stop.is_set():
            raise _StreamBroken("stopping")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise _StreamBroken(f"the {kind} list is not JSON ({e})") from None
        items = doc.get("items") if isinstance(doc, dict) else None
        rv = _resource_version(doc) if isinstance(doc, dict) else None
        if items is None:
            items = []
        if not isinstance(items, list) or rv is None:
            raise _StreamBroken(f"the {kind} list has no items or no metadata.resourceVersion")
        with self._lock:
            if kind == "pods":
                self._replace_pods(items)
            else:
                self._replace_namespaces(items)
            self._resource_versions[kind] = rv
        if kind == "namespaces":
            self._ns_synced.set()
        return rv

    def _lines(self, resp: Any) -> Iterator[bytes]:
        buf = b""
        for chunk in resp.stream(amt=None, decode_content=True):
            buf += chunk
            while True:
                line, sep, rest = buf.partition(b"\n")
                if not sep:
                    break
                buf = rest
                if line.strip():
                    yield line
            if len(buf) > MAX_LINE_BYTES:
                raise _StreamBroken(f"a watch line is longer than {MAX_LINE_BYTES} bytes")
        if buf.strip():
            yield buf

    def _watch(self, kind: str, rv: str, stop: threading.Event, on_open: Callable[[], None]) -> int:
        """Watch ``kind`` from ``rv`` until the stream ends; returns the number of events."""
        resp = self._call(
            kind,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            _request_timeout=(self.request_timeout, self.watch_timeout + self.request_timeout),
        )
        self._track(resp, stop)
        events = 0
        try:
            on_open()
            for line in self._lines(resp):
                if stop.is_set():
                    break
                self._handle_line(kind, line)
                events += 1
        finally:
            self._untrack(resp)
        return events

    def _handle_line(self, kind: str, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError as e:
            self._error(f"malformed watch event for {kind} skipped ({e}): {line[:120]!r}", kind=kind)
            return
        if not isinstance(event, dict):
            self._error(f"malformed watch event for {kind} skipped: {line[:120]!r}", kind=kind)
            return
        typ, obj = event.get("type"), event.get("object")
        if typ == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == 410:
                raise _Gone(f"410 Gone in the {kind} watch")
            message = obj.get("message") if isinstance(obj, dict) else obj
            raise _StreamBroken(f"ERROR event in the {kind} watch (code {code}): {str(message)[:200]}")
        if typ == "BOOKMARK":
            rv = _resource_version(obj)
            if rv is None:
                self._error(f"bookmark without resourceVersion in the {kind} watch", kind=kind)
                return
            with self._lock:
                self._resource_versions[kind] = rv
            return
        if typ not in ("ADDED", "MODIFIED", "DELETED"):
            self._error(f"watch event of unknown type {str(typ)[:32]!r} for {kind} skipped", kind=kind)
            return
        with self._lock:
            try:
                if kind == "pods":
                    if typ == "DELETED":
                        self._forget_pod(pod_identity(obj)[0])
                    else:
                        self._set_pod(obj)
                else:
                    self._set_namespace(obj, deleted=typ == "DELETED")
            except Malformed as e:
                self._error(f"{typ} event skipped: {e}", kind=kind)
            rv = _resource_version(obj)
            if rv is not None:
                self._resource_versions[kind] = rv

    def _loop(self, kind: str, stop: threading.Event) -> None:
        """List, then watch, until stopped (the skeleton: sockops/sources/listwatch.py)."""
        backoff = Backoff(self.backoff_base, self.backoff_cap)
        must_list = True
        pending: str | None = None  # why the last stream ended, reported once re-established
        if kind == "pods":
            deadline = time.monotonic() + self.namespace_wait
            while not (self._ns_synced.is_set() or stop.is_set()) and time.monotonic() < deadline:
                self._ns_synced.wait(0.1)

        def established() -> None:
            nonlocal pending
            if pending is not None:
                self._restarted(pending)
                pending = None

        def session() -> None:
            nonlocal must_list, pending
            if must_list:
                self._list(kind, stop)
                must_list = False
                established()
            rv = self.resource_versions[kind]
            assert rv is not None
            started = time.monotonic()
            events = self._watch(kind, rv, stop, established)
            if stop.is_set():
                return
            lasted = time.monotonic() - started
            if lasted >= self.watch_timeout * 0.9:
                backoff.reset()  # the server's timeout: normal, re-watch at once, not a restart
                return
            pending = f"the API server closed the {kind} watch after {lasted:.1f}s"
            if not events:
                raise _StreamBroken(pending)
            backoff.reset()

        def classify(e: Exception) -> Failure:
            nonlocal must_list, pending
            if isinstance(e, _StreamBroken):
                return Failure(str(e))
            if isinstance(e, _Gone):
                # 410 Gone, as an ERROR event in the stream or as the HTTP status of the watch
                must_list, pending = True, f"410 Gone for the {kind} watch: re-listed"
                if backoff.attempts == 0:
                    backoff.attempts = 1  # re-list at once, but back off if it loops
                    return Failure(pending, at_once=True)
                return Failure(pending)
            return self._classify(kind, e)

        def on_retry(failure: Failure, delay: float) -> None:
            nonlocal pending
            pending = failure.reason
            if failure.permanent:
                self._error(failure.reason, kind=kind)
            else:
                log.warning("kubernetes source: %s", failure.reason)

        retry_until_stopped(
            stop, session, classify, on_retry, backoff, lambda: self.auth_backoff * random.uniform(0.8, 1.2)
        )

    def _classify(self, kind: str, e: Exception) -> Failure:
        """Temporary (retry with backoff) or permanent (report with the fix, retry slowly).

        410 Gone never gets here: :meth:`_call` and the stream raise it as ``_Gone`` (re-list)."""
        from kubernetes.client.exceptions import ApiException

        if isinstance(e, ApiException):
            status = e.status or 0
            if status == 401:
                return Failure(
                    f"the API server rejected the agent's credentials (401) listing {kind}: "
                    "check the ServiceAccount token or the kubeconfig's user",
                    permanent=True,
                )
            if status == 403:
                return Failure(f"403 Forbidden on {kind}: " + RBAC_FIX.format(what=kind), permanent=True)
            if status == 429 or status >= 500 or status == 0:
                return Failure(f"API error {status} on {kind}: {str(e.reason)[:200]}")
            return Failure(f"API error {status} on {kind}: {str(e.reason)[:200]}", permanent=True)
        if isinstance(e, OSError | http.client.HTTPException | _urllib3_errors()):
            return Failure(f"connection to the API server lost ({type(e).__name__}: {str(e)[:200]})")
        log.exception("kubernetes source: unexpected error in the %s loop", kind)
        return Failure(f"unexpected error in the {kind} loop: {type(e).__name__}: {str(e)[:200]}")


def _urllib3_errors() -> type[Exception]:
    import urllib3.exceptions

    return urllib3.exceptions.HTTPError
