"""Upgrade or removal? The agent watches its own DaemonSet to know what a SIGTERM means.

A SIGTERM reaches the agent in two situations that need opposite answers:

* an **upgrade** (rolling update, a ConfigMap change, a node drain): the pod is replaced and the
  DaemonSet stays. Programs must stay attached and maps pinned so accelerated connections keep
  running while no agent runs; the next agent adopts them (README "Upgrade").
* a **removal** (``kubectl delete -k daemonset/``, a GitOps prune): the DaemonSet itself is
  deleted and no agent will come back. Programs left attached would go on accelerating, unmanaged,
  with the alert that would notice deleted too; so the agent runs ``sockops uninstall``'s drain
  before it exits.

The agent tells them apart by its DaemonSet: found through its own pod's ``ownerReferences``
(``POD_NAME``/``POD_NAMESPACE`` from the downward API), then listed and watched by name. Deleted, or
carrying a ``deletionTimestamp`` (foreground deletion), means removal. A watch and not a look-up
at SIGTERM time, because ``kubectl delete -k`` deletes the Namespace and the RBAC objects before the
DaemonSet (kustomize's order): by the time the pods get SIGTERM the agent may no longer be allowed
to read anything, while a watch opened earlier still delivers the DELETED event. At SIGTERM, if
the watch has not seen a deletion, one short GET confirms (404 or a deletionTimestamp: removal);
anything else, an error included, keeps today's safe answer: an upgrade, nothing detached.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sockops.sources import Backoff

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 0.3  # seconds of the SIGTERM budget the confirming GET may use
RBAC_FIX = (
    "the agent cannot read its DaemonSet ({error}): apply daemonset/agent/rbac.yaml (a Role with "
    "get, list, watch on daemonsets in the agent's namespace); until then a deletion of the "
    "DaemonSet leaves the programs attached, as an upgrade does"
)


def _deleting(obj: Any) -> bool:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return isinstance(meta, dict) and bool(meta.get("deletionTimestamp"))


class OwnerWatch:
    """Knows whether the DaemonSet that owns the pod ``namespace/pod_name`` is being deleted."""

    def __init__(self, api_client: Any, namespace: str, pod_name: str, backoff_cap: float = 30.0) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.pod_name = pod_name
        self.daemonset: str | None = None
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._removing = threading.Event()
        self._backoff_cap = backoff_cap

    @property
    def removing(self) -> bool:
        return self._removing.is_set()

    def _mark(self, why: str) -> None:
        if not self._removing.is_set():
            log.warning(
                "the agent's DaemonSet is being deleted: the next SIGTERM drains and uninstalls",
                extra={"fields": {"daemonset": f"{self.namespace}/{self.daemonset}", "seen": why}},
            )
        self._removing.set()

    def _owner(self) -> str | None:
        import json

        resp = self._core.read_namespaced_pod(
            self.pod_name, self.namespace, _preload_content=False, _request_timeout=10
        )
        pod = json.loads(resp.data)
        for ref in pod.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") == "DaemonSet" and ref.get("controller", True):
                return str(ref["name"])
        return None

    def run(self, stop: threading.Event) -> None:
        """Find the DaemonSet, then list and watch it until ``stop``; never raises."""
        import json

        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        backoff = Backoff(base=1.0, cap=self._backoff_cap)
        reported = False
        while not stop.is_set():
            try:
                if self.daemonset is None:
                    self.daemonset = self._owner()
                    if self.daemonset is None:
                        log.info("the agent's pod has no DaemonSet owner: SIGTERM never uninstalls")
                        return
                resp = self._apps.list_namespaced_daemon_set(
                    self.namespace,
                    field_selector=f"metadata.name={self.daemonset}",
                    _preload_content=False,
                    _request_timeout=10,
                )
                listed = json.loads(resp.data)
                items = listed.get("items") or []
                if not items:
                    self._mark("gone at list")
                elif _deleting(items[0]):
                    self._mark("deletionTimestamp at list")
                rv = listed.get("metadata", {}).get("resourceVersion")
                backoff.reset()
                reported = False
                for event in watch.Watch(return_type="object").stream(
                    self._apps.list_namespaced_daemon_set,
                    self.namespace,
                    field_selector=f"metadata.name={self.daemonset}",
                    resource_version=rv,
                    timeout_seconds=300,
                    _request_timeout=330,  # a silent, half-open connection ends too
                ):
                    obj = event.get("raw_object") or {}  # plain JSON: no model validation
                    if event.get("type") == "DELETED":
                        self._mark("DELETED event")
                    elif _deleting(obj):
                        self._mark("deletionTimestamp")
                    if stop.is_set():
                        return
            except ApiException as e:
                if e.status in (401, 403) and not reported:
                    log.error(RBAC_FIX.format(error=f"{e.status} {e.reason}"))
                    reported = True
            except Exception as e:  # the API server is away: retry, keep what is known
                log.debug("daemonset watch: %s", e)
            stop.wait(backoff.next())

    def confirm(self, timeout: float = CONFIRM_TIMEOUT) -> bool:
        """At SIGTERM: removal if the watch saw it, or one quick GET says so; else upgrade."""
        if self.removing:
            return True
        if self.daemonset is None:
            return False
        import json

        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._apps.read_namespaced_daemon_set(
                self.daemonset, self.namespace, _preload_content=False, _request_timeout=timeout
            )
            if _deleting(json.loads(resp.data)):
                self._mark("deletionTimestamp at SIGTERM")
        except ApiException as e:
            if e.status == 404:
                self._mark("404 at SIGTERM")
        except Exception as e:
            log.debug("daemonset check at SIGTERM: %s", e)
        return self.removing
