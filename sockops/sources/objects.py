"""API objects -> :class:`Workload`: the pure translation the sources apply to what they see.

No I/O and no state: a Kubernetes pod or namespace object (plain JSON, as the API server sends it)
or a docker ``inspect`` result in, the desired state (or :class:`Malformed`) out. The sources
(kubernetes.py, docker.py) do the listing, watching and retrying around it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sockops.workload import (
    ISTIO_PROXY_CONTAINER,
    ISTIO_SIDECAR_STATUS,
    MAX_ANNOTATION_LEN,
    RESET_ANNOTATION,
    IstioCapture,
    Locator,
    Workload,
    decide,
    decide_container,
    parse_istio,
)

KUBERNETES = "kubernetes"
DOCKER = "docker"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# The API server refuses more than this in one object's annotations (TotalAnnotationSizeLimitB);
# anything larger did not come from a real API server and is not worth parsing.
MAX_ANNOTATIONS_BYTES = 256 * 1024
MAX_NAME_LEN = 253
DEFAULT_NAMESPACE = "docker"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"


class Malformed(ValueError):
    """An API object sockops cannot read; the message says what is wrong with it."""


# -- objects -> workloads ------------------------------------------------------------------------


def _str_map(value: Any, what: str) -> dict[str, str]:
    """A labels/annotations map as the API defines it (string to string), or Malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"{what} is a {type(value).__name__}, not a map")
    size = 0
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise Malformed(f"{what} must map strings to strings (key {str(k)[:64]!r})")
        size += len(k) + len(v)
    if size > MAX_ANNOTATIONS_BYTES:
        raise Malformed(
            f"{what} hold {size} bytes, more than the API server's limit of {MAX_ANNOTATIONS_BYTES}"
        )
    return value


def _name(meta: dict[str, Any], key: str, what: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise Malformed(f"{what} has no usable metadata.{key} ({str(value)[:64]!r})")
    return value


def pod_identity(pod: Any) -> tuple[str, str, str]:
    """``(uid, namespace, name)`` of a pod object, or Malformed when it has none usable."""
    if not isinstance(pod, dict):
        raise Malformed(f"pod object is a {type(pod).__name__}, not a JSON object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise Malformed("pod object has no metadata")
    return _name(meta, "uid", "pod"), _name(meta, "namespace", "pod"), _name(meta, "name", "pod")


def pod_node(pod: dict[str, Any]) -> str | None:
    spec = pod.get("spec")
    node = spec.get("nodeName") if isinstance(spec, dict) else None
    return node if isinstance(node, str) else None


def pod_is_gone(pod: dict[str, Any]) -> bool:
    """Terminal or being deleted: its sockets are closing, nothing is left to accelerate."""
    meta = pod.get("metadata") or {}
    if isinstance(meta, dict) and meta.get("deletionTimestamp"):
        return True
    status = pod.get("status")
    return isinstance(status, dict) and status.get("phase") in TERMINAL_PHASES


def _has_istio_proxy(spec: dict[str, Any]) -> bool:
    """An ``istio-proxy`` container, or init container (native sidecars are init containers)."""
    for key in ("containers", "initContainers"):
        containers = spec.get(key)
        if not isinstance(containers, list):
            continue
        for c in containers:
            if isinstance(c, dict) and c.get("name") == ISTIO_PROXY_CONTAINER:
                return True
    return False


@dataclass(frozen=True)
class PodReading:
    """One pod object read once: its identity, node, desired state, and what made it unreadable.

    ``workload`` is None when the pod is gone for us (terminal, being deleted). ``problem`` is set
    when the pod has an identity but unreadable content (annotations of the wrong type or size,
    spec not an object): the workload is then not accelerated (it must not keep acceleration a
    previous, valid version of it had) and ``problem`` is what the user should be told.
    """

    uid: str
    namespace: str
    name: str
    node: str | None
    workload: Workload | None
    problem: str | None = None


def read_pod(pod: Any, namespace_labels: Callable[[str], Mapping[str, str] | None]) -> PodReading:
    """The pod as desired state, deciding with ``namespace_labels(its namespace)`` (None: unknown).

    Raises :class:`Malformed` when the pod has no usable identity.
    """
    uid, namespace, name = pod_identity(pod)
    node = pod_node(pod)
    if pod_is_gone(pod):
        return PodReading(uid, namespace, name, node, None)

    sidecar: bool | None = None
    capture = IstioCapture()
    problem = _unreadable(pod, namespace, name)
    observe = False
    reset = ""
    if problem is not None:
        accelerate, reason, errors = False, "unreadable pod object", [problem]
    else:
        spec = pod.get("spec") or {}
        annotations = pod["metadata"].get("annotations") or {}
        reset = str(annotations.get(RESET_ANNOTATION, ""))[:MAX_ANNOTATION_LEN]
        decision = decide(annotations, namespace_labels(namespace))
        capture, istio_errors = parse_istio(annotations)
        errors = ([decision.error] if decision.error else []) + istio_errors
        accelerate, reason, observe = decision.accelerate, decision.reason, decision.observe
        if spec.get("hostNetwork") is True:
            # The pod's sockets live in the node's netns: accelerating it would accelerate the node
            # (and observing it would report the node's programs as the pod's).
            accelerate, reason, observe = False, "host network", False
        sidecar = True if (ISTIO_SIDECAR_STATUS in annotations or _has_istio_proxy(spec)) else None
    workload = Workload(
        source=KUBERNETES,
        uid=uid,
        namespace=namespace,
        name=name,
        accelerate=accelerate,
        reason=reason,
        locator=Locator(pod_uid=uid),
        sidecar=sidecar,
        capture=capture,
        errors=tuple(errors),
        observe=observe,
        reset=reset,
    )
    return PodReading(uid, namespace, name, node, workload, problem)


def _unreadable(pod: dict[str, Any], namespace: str, name: str) -> str | None:
    """What makes a pod with an identity unreadable (spec not an object, bad annotations), or None."""
    spec = pod.get("spec")
    if spec is not None and not isinstance(spec, dict):
        return f"pod {namespace}/{name}: spec is a {type(spec).__name__}, not an object"
    try:
        _str_map(pod["metadata"].get("annotations"), f"pod {namespace}/{name}: annotations")
    except Malformed as e:
        return str(e)
    return None


def pod_to_workload(pod: Any, namespace_labels: Mapping[str, str] | None) -> Workload | None:
    """:func:`read_pod`'s workload for a pod whose namespace has ``namespace_labels``."""
    return read_pod(pod, lambda _namespace: namespace_labels).workload


def namespace_of(obj: Any) -> tuple[str, dict[str, str]]:
    """``(name, labels)`` of a namespace object; Malformed when it has no name.

    Labels of the wrong type are also Malformed; the caller then treats the namespace as
    unlabelled (the default is "not accelerated": an unreadable label never turns acceleration on).
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise Malformed("namespace object has no metadata")
    name = _name(obj["metadata"], "name", "namespace")
    return name, _str_map(obj["metadata"].get("labels"), f"namespace {name}: labels")


def _resource_version(obj: Any) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        rv = obj["metadata"].get("resourceVersion")
        if isinstance(rv, str) and rv:
            return rv
    return None


def _resource_name(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN else None


# -- docker


def network_mode_veto(network_mode: str) -> str | None:
    """Why a container with this network mode must not be accelerated, or None.

    Docker reports ``host``, ``none``, ``default``, ``bridge``, a network name, or
    ``container:<id>`` (sharing another container's namespace).
    """
    if network_mode == "host":
        return "runs in the host's network namespace (--network host), which sockops never accelerates"
    if network_mode.startswith("container:"):
        other = network_mode.split(":", 1)[1][:12]
        return (
            f"shares the network namespace of container {other} (--network container:...): "
            f"label that container instead"
        )
    return None


def container_to_workload(info: Mapping[str, Any]) -> Workload | None:
    """The workload for one ``inspect`` result; None when the container is not running.

    A container that is not running has no processes and so no network namespace to enable: the
    source reports it as gone rather than as "not accelerated".
    """
    state = info.get("State") or {}
    pid = int(state.get("Pid") or 0)
    if not state.get("Running") or pid <= 0:
        return None
    config = info.get("Config") or {}
    labels = {str(k): str(v) for k, v in (config.get("Labels") or {}).items()}
    decision = decide_container(labels)
    accelerate, reason, observe = decision.accelerate, decision.reason, decision.observe
    veto = network_mode_veto(str((info.get("HostConfig") or {}).get("NetworkMode") or ""))
    if veto:
        reason = f"{reason}, but it {veto}" if accelerate or observe else f"{reason}; it {veto}"
        accelerate = observe = False
    return Workload(
        source=DOCKER,
        uid=str(info["Id"]),
        namespace=labels.get(COMPOSE_PROJECT_LABEL) or DEFAULT_NAMESPACE,
        name=str(info.get("Name") or info["Id"][:12]).lstrip("/"),
        accelerate=accelerate,
        reason=reason,
        locator=Locator(pid=pid),
        errors=(decision.error,) if decision.error else (),
        observe=observe,
        reset=labels.get(RESET_ANNOTATION, "")[:MAX_ANNOTATION_LEN],
    )
