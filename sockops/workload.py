"""Desired state: the workloads (pods, containers, named namespaces) the agent may accelerate.

Sources turn the world into :class:`Workload` values; the reconciler turns those into map state.
Everything a source needs to decide is here, so the opt-in rules and the parsing of annotations
are written once and fuzzed once, whichever source read them.

Opt-in rules (the pod annotation wins over the namespace default):

* pod annotation ``sockops.io/accelerate: "true" | "false" | "observe"``;
* namespace label ``sockops.io/accelerate=enabled | disabled`` sets the default of its pods;
* anything else: not accelerated.

``observe`` (pod annotation, docker label) never enables the pod: the agent only reports what its
programs' sockets would get (sockops/observe.py), so a team can look before it opts in
(docs/DATAPLANE.md, "Observe mode"). The namespace label has no such value: observing is a
decision about one workload.

A value that is not one of these is a user's mistake, not a reason to guess: the workload is not
accelerated, and its reason says which value was wrong and what to write instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

ANNOTATION = "sockops.io/accelerate"
NAMESPACE_LABEL = "sockops.io/accelerate"
DOCKER_LABEL = "sockops.io/accelerate"
# A new value (any: a date, a counter) resets the pod's breaker (sockops/breaker.py).
RESET_ANNOTATION = "sockops.io/breaker-reset"

# Istio's per-pod capture annotations (docs/DATAPLANE.md, "Istio's capture").
ISTIO_INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
ISTIO_EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
ISTIO_INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
ISTIO_EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
ISTIO_EXCLUDE_OUTBOUND_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ISTIO_SIDECAR_STATUS = "sidecar.istio.io/status"
ISTIO_PROXY_CONTAINER = "istio-proxy"

MAX_ANNOTATION_LEN = 4096


class InvalidValue(ValueError):
    """A label or annotation value sockops cannot use; the message says what would be valid."""


# What the agent does with a workload (Decision.mode, Workload.mode).
ACCELERATE = "accelerate"
OBSERVE = "observe"
OFF = "off"


@dataclass(frozen=True)
class Decision:
    accelerate: bool  # enable the namespace in the maps; never true together with observe
    reason: str
    error: str | None = None  # set when a value was invalid (counted and logged by the reconciler)
    observe: bool = False  # report the pod's sockets, do not enable it

    @property
    def mode(self) -> str:
        return ACCELERATE if self.accelerate else OBSERVE if self.observe else OFF


def _one_of(value: str, valid: tuple[str, ...], what: str) -> str:
    """``value`` normalised if it is one of ``valid``, else an error that lists them all."""
    v = value.strip().lower()
    if v in valid:
        return v
    # The first two are the on/off pair every value set has; a third is worded as an extra so
    # that the message stays the one users (and their alerts) already know.
    hint = f'write "{valid[0]}" or "{valid[1]}"'
    if len(valid) > 2:
        hint += ", or " + ", ".join(f'"{x}"' for x in valid[2:]) + " to report without accelerating"
    raise InvalidValue(f'{what}="{value[:64]}" is not valid: {hint}')


WORKLOAD_VALUES = ("true", "false", OBSERVE)  # pod annotation, docker label
NAMESPACE_VALUES = ("enabled", "disabled")


def _decision(value: str, reason: str) -> Decision:
    """The decision for a valid workload or namespace value (see the module docstring)."""
    on = value in ("true", "enabled")
    return Decision(on, reason, observe=value == OBSERVE)


def decide(annotations: Mapping[str, str] | None, namespace_labels: Mapping[str, str] | None) -> Decision:
    """Whether a pod is accelerated (or only observed), and why: the one place the opt-in rules live."""
    # In order of precedence: the pod's annotation wins over its namespace's default.
    rules = (
        (annotations, ANNOTATION, WORKLOAD_VALUES, "pod annotation", ANNOTATION),
        (namespace_labels, NAMESPACE_LABEL, NAMESPACE_VALUES, "namespace label",
         f"namespace label {NAMESPACE_LABEL}"),
    )  # fmt: skip
    for values, key, valid, what, name in rules:
        if values and key in values:
            try:
                v = _one_of(str(values[key]), valid, name)
            except InvalidValue as e:
                return Decision(False, f"invalid {what}", str(e))
            return _decision(v, f"{what} {key}={v}")
    return Decision(False, "not opted in")


def decide_container(labels: Mapping[str, str] | None) -> Decision:
    """Docker: the container label ``sockops.io/accelerate=true`` opts a container in
    (``observe``: report only)."""
    labels = labels or {}
    if DOCKER_LABEL not in labels:
        return Decision(False, "not opted in")
    try:
        v = _one_of(str(labels[DOCKER_LABEL]), WORKLOAD_VALUES, f"label {DOCKER_LABEL}")
    except InvalidValue as e:
        return Decision(False, "invalid container label", str(e))
    return _decision(v, f"container label {DOCKER_LABEL}={v}")


# -- Istio capture annotations -------------------------------------------------------------------


def _items(value: str, name: str) -> list[str] | None:
    """The comma-separated items of an Istio list annotation; None for ``*`` (everything)."""
    if len(value) > MAX_ANNOTATION_LEN:
        raise InvalidValue(f"{name} is longer than {MAX_ANNOTATION_LEN} characters")
    v = value.strip()
    if v == "*":
        return None
    return [p for p in (p.strip() for p in v.split(",")) if p]


def parse_ports(value: str, name: str) -> tuple[int, ...] | None:
    """A port list as istio-iptables takes it: ``*`` (all, returned as None), ``""`` or ``a,b,c``."""
    items = _items(value, name)
    if items is None:
        return None
    for part in items:
        # isascii(): str.isdigit() also accepts digits int() refuses, such as "²".
        if not (part.isascii() and part.isdigit()) or not 0 < int(part) < 65536:
            raise InvalidValue(
                f'{name}="{value[:64]}": "{part[:16]}" is not a port (1-65535), use a,b,c or *'
            )
    return tuple(int(p) for p in items)


def parse_cidrs(value: str, name: str) -> tuple[str, ...] | None:
    """A CIDR list (``*`` = every address, returned as None)."""
    items = _items(value, name)
    if items is None:
        return None
    out = []
    for part in items:
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise InvalidValue(
                f'{name}="{value[:64]}": "{part[:45]}" is not a CIDR, e.g. 10.0.0.0/8'
            ) from None
    return tuple(out)


@dataclass(frozen=True)
class IstioCapture:
    """What a pod's Istio annotations say about capture; None fields mean "Istio's default".

    The kernel side pairs through the capture ports the pod's nat table really has (istio-init
    applied these annotations when it wrote the rules); the agent keeps them to report them, to
    validate them, and to know that a pod whose outbound capture is switched off has no outbound
    leg through the original-destination map.
    """

    include_outbound_ports: tuple[int, ...] | None = None
    exclude_outbound_ports: tuple[int, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ranges: tuple[str, ...] | None = ()

    @property
    def outbound_captured(self) -> bool:
        """False when the annotations switch outbound capture off entirely."""
        return not (self.include_outbound_ports == () or self.exclude_outbound_ranges is None)

    @property
    def inbound_captured(self) -> bool:
        return self.include_inbound_ports != ()


def parse_istio(annotations: Mapping[str, str] | None) -> tuple[IstioCapture, list[str]]:
    """The pod's capture annotations, plus one message per invalid one (which is then ignored)."""
    annotations = annotations or {}
    errors: list[str] = []
    kw: dict[str, object] = {}
    for key, attr, parser in (
        (ISTIO_INCLUDE_OUTBOUND_PORTS, "include_outbound_ports", parse_ports),
        (ISTIO_EXCLUDE_OUTBOUND_PORTS, "exclude_outbound_ports", parse_ports),
        (ISTIO_INCLUDE_INBOUND_PORTS, "include_inbound_ports", parse_ports),
        (ISTIO_EXCLUDE_INBOUND_PORTS, "exclude_inbound_ports", parse_ports),
        (ISTIO_EXCLUDE_OUTBOUND_RANGES, "exclude_outbound_ranges", parse_cidrs),
    ):
        if key not in annotations:
            continue
        try:
            value = parser(str(annotations[key]), key)
        except InvalidValue as e:
            errors.append(str(e))
            continue
        if value is None and attr.startswith("exclude") and attr != "exclude_outbound_ranges":
            errors.append(f'{key}="*" is not meaningful; list ports instead')
            continue
        kw[attr] = value
    return IstioCapture(**kw), errors  # type: ignore[arg-type]


# -- the unit of desired state ---------------------------------------------------------------------


@dataclass(frozen=True)
class Locator:
    """How to find a workload's network namespace, fastest hint first.

    ``pid``: a process known to be inside (docker's State.Pid); ``netns``: a name or path (static);
    ``pod_uid``: search /proc for a process whose cgroup path holds the pod UID (runtime-agnostic).
    """

    pid: int | None = None
    netns: str | None = None
    pod_uid: str | None = None


@dataclass(frozen=True)
class Workload:
    """One pod, container or namespace and what the agent should do with it.

    ``uid`` is unique within its source (pod UID, container id, namespace name). ``sidecar`` is a
    hint from the source (an istio-proxy container was declared); None means read it from the
    namespace's nat rules. ``observe``: resolve and report the workload's sockets, never enable
    it (``accelerate`` is then False).
    """

    source: str
    uid: str
    namespace: str
    name: str
    accelerate: bool
    reason: str
    locator: Locator
    sidecar: bool | None = None
    capture: IstioCapture = field(default_factory=IstioCapture)
    errors: tuple[str, ...] = ()  # invalid annotations or labels, each a message for the user
    observe: bool = False
    reset: str = ""  # its sockops.io/breaker-reset annotation (label): a new value resets its breaker

    @property
    def mode(self) -> str:
        return ACCELERATE if self.accelerate else OBSERVE if self.observe else OFF

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.uid)

    def log_fields(self) -> dict[str, object]:
        return {"source": self.source, "namespace": self.namespace, "pod": self.name, "uid": self.uid}
