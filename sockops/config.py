"""The agent's settings: one table of flags, each with its environment variable and default.

Defined once so the command line, the DaemonSet's env and the tests that check the manifests
against the code all read the same names: renaming a setting here and not in daemonset/ fails a
test.

An environment value is checked exactly like the flag's value (same type, same choices), but only
when a command that has the setting is parsed: a bad ``SOCKOPS_SOCKHASH_SIZE`` must not break
``sockops doctor --help``, and must not crash ``sockops agent`` with a traceback either. It is a
usage error (exit 2) that names the variable, because the operator who wrote it into a ConfigMap
looks for that name, not for the flag.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EnvDefault:
    """A setting's raw environment (or built-in) value, converted when its command is parsed."""

    setting: Setting
    raw: str
    from_env: bool

    def convert(self) -> Any:
        s = self.setting
        if s.repeatable:
            values = [self._one(v.strip()) for v in self.raw.split(",") if v.strip()]
            return values
        return self._one(self.raw) if self.raw != "" else None

    def _one(self, raw: str) -> Any:
        value = self.setting.type(raw)
        if self.setting.choices and value not in self.setting.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {raw!r} (choose from {', '.join(self.setting.choices)})"
            )
        return value


class _AppendOverEnv(argparse.Action):
    """``append``, but the first flag replaces the environment's list instead of extending it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = list(current) if isinstance(current, list) else []
        items.append(values)
        setattr(namespace, self.dest, items)


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser that turns the environment defaults of the parsed command into values.

    Subcommand parsers made with ``add_subparsers().add_parser`` are of this class too, so each
    checks its own settings and reports an error with its own usage line.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        for dest, value in list(vars(ns).items()):
            if not isinstance(value, EnvDefault):
                continue
            try:
                setattr(ns, dest, value.convert())
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                where = f"environment variable {value.setting.env}" if value.from_env else "built-in default"
                self.error(
                    f"{where}={value.raw!r} is not valid for {value.setting.flag}: {e}; "
                    f"fix or unset {value.setting.env}"
                )
        return ns, extras


@dataclass(frozen=True)
class Setting:
    flag: str
    env: str
    default: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    repeatable: bool = False  # comma-separated in the environment, repeatable as a flag

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def env_default(self) -> EnvDefault:
        raw = os.environ.get(self.env)
        return EnvDefault(self, self.default if raw is None else raw, raw is not None)

    def add_to(self, p: argparse.ArgumentParser) -> None:
        default = self.env_default()
        shown = default.raw or "none"
        if self.repeatable:
            p.add_argument(
                self.flag,
                action=_AppendOverEnv,
                type=self.type,
                choices=self.choices,
                default=default,
                help=f"{self.help} (repeatable; env {self.env}, comma-separated; default {shown})",
            )
            return
        p.add_argument(
            self.flag,
            type=self.type,
            choices=self.choices,
            default=default,
            help=f"{self.help} (env {self.env}; default {shown})",
        )


def _path(v: str) -> Path:
    return Path(v)


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be a positive integer")
    return n


def _positive_float(v: str) -> float:
    try:
        n = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if not n > 0 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be a positive number of seconds")
    return n


def _non_negative_float(v: str) -> float:
    try:
        n = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
    if not n >= 0 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be 0 or a positive number of seconds")
    return n


def _queue_budget(v: str) -> int:
    n = _positive_int(v)
    if n < 65536 or n >= 1 << 31:
        raise argparse.ArgumentTypeError(
            f"{v} is outside 65536 (one message) .. 2147483647 bytes (the kernel counts it in 32 bits)"
        )
    return n


def _proxy_uid(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r} is not a UID (a number)") from None
    if not 0 < n < 1 << 32:
        raise argparse.ArgumentTypeError(f"{v} is outside 1 .. 4294967295 (0 is root: never trusted)")
    return n


def _thresholds(v: str) -> dict[str, int]:
    from sockops.breaker import InvalidThresholds, parse_thresholds

    try:
        return parse_thresholds(v)
    except InvalidThresholds as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(v: str) -> str:
    from sockops.health import parse_addr

    try:
        parse_addr(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


# RFC 1123 subdomain: what the API server accepts as a node, pod or namespace name.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _dns_name(v: str) -> str:
    if v and (len(v) > 253 or not _DNS_SUBDOMAIN.fullmatch(v)):
        raise argparse.ArgumentTypeError(
            f"{v[:64]!r} is not a Kubernetes name (RFC 1123: lowercase letters, digits, '-' and '.')"
        )
    return v


BPFFS = Setting(
    "--bpffs", "SOCKOPS_BPFFS", "/sys/fs/bpf/sockops", "bpffs directory of the pinned maps", _path
)
LOG_FORMAT = Setting(
    "--log-format", "SOCKOPS_LOG_FORMAT", "text", "log line format", choices=("text", "json")
)
LOG_LEVEL = Setting(
    "--log-level",
    "SOCKOPS_LOG_LEVEL",
    "info",
    "lowest level logged",
    choices=("debug", "info", "warning", "error"),
)
STATE_FILE = Setting(
    "--state-file",
    "SOCKOPS_STATE_FILE",
    "/run/sockops/state.json",
    "where the agent publishes each workload's state for `sockops status`",
    _path,
)
CGROUP = Setting(
    "--cgroup",
    "SOCKOPS_CGROUP",
    "",
    "cgroup v2 directory sock_ops is attached to (default: the cgroup v2 root)",
    _path,
)
SIZES = (
    Setting("--sockhash-size", "SOCKOPS_SOCKHASH_SIZE", "65536", "sockets the sockhash holds", _positive_int),
    Setting(
        "--pending-size",
        "SOCKOPS_PENDING_SIZE",
        "16384",
        "connections waiting for their peer (original-destination map)",
        _positive_int,
    ),
    Setting("--netns-size", "SOCKOPS_NETNS_SIZE", "1024", "namespaces that can be enabled", _positive_int),
)

AGENT = (
    Setting(
        "--source",
        "SOCKOPS_SOURCE",
        "static",
        "where desired state comes from: kubernetes, docker, static",
        repeatable=True,
        choices=("kubernetes", "docker", "static"),
    ),
    CGROUP,
    Setting(
        "--netns", "SOCKOPS_STATIC_NETNS", "", "static source: a namespace to accelerate", repeatable=True
    ),
    Setting(
        "--node-name",
        "NODE_NAME",
        "",
        "kubernetes source: this node's name (downward API spec.nodeName)",
        _dns_name,
    ),
    Setting(
        "--pod-name",
        "POD_NAME",
        "",
        "kubernetes source: the agent's own pod (downward API metadata.name); with --pod-namespace "
        "the agent watches its DaemonSet and uninstalls when that is deleted",
        _dns_name,
    ),
    Setting(
        "--pod-namespace",
        "POD_NAMESPACE",
        "",
        "kubernetes source: the agent's own namespace (downward API metadata.namespace)",
        _dns_name,
    ),
    Setting("--kubeconfig", "KUBECONFIG", "", "kubernetes source: kubeconfig outside a cluster", _path),
    Setting(
        "--docker-host",
        "SOCKOPS_DOCKER_HOST",
        "",
        "docker source: the engine's address (default: DOCKER_HOST, else unix:///var/run/docker.sock)",
    ),
    Setting(
        "--resync",
        "SOCKOPS_RESYNC_SECONDS",
        "30",
        "seconds between resyncs that repair drift",
        _positive_float,
    ),
    Setting(
        "--late-insertion",
        "SOCKOPS_LATE_INSERTION",
        "on",
        "on: connections established before their pod was enabled join at the next pass (after "
        "an enable and at every resync) when both ends are event-loop sockets; off: only at "
        "their handshake (docs/DATAPLANE.md, Late insertion)",
        choices=("on", "off"),
    ),
    Setting(
        "--reader-hook",
        "SOCKOPS_READER_HOOK",
        "on",
        "on: a raw tracepoint on sys_enter learns which programs read sockets with splice(), and "
        "their sockets stay on plain TCP (about 100 ns on every syscall of the node); off: no "
        "tracepoint, and splice readers must be kept out of enabled pods by hand "
        "(docs/DATAPLANE.md, Splice readers)",
        choices=("on", "off"),
    ),
    Setting(
        "--metrics-addr",
        "SOCKOPS_METRICS_ADDR",
        "0.0.0.0:9876",
        "address of /metrics, /healthz, /readyz",
        _address,
    ),
    Setting(
        "--if-unsupported",
        "SOCKOPS_IF_UNSUPPORTED",
        "exit",
        "when the kernel cannot run the programs: exit (non-zero) or idle (serve metrics, "
        "accelerate nothing)",
        choices=("exit", "idle"),
    ),
    Setting(
        "--pod-metric-labels",
        "SOCKOPS_POD_METRIC_LABELS",
        "pod",
        "labels of the per-pod metrics: pod (namespace and pod), namespace (pods summed per "
        "namespace) or off (one node total); docs/OBSERVABILITY.md has the series counts",
        choices=("pod", "namespace", "off"),
    ),
)

# The guard of issue 12: the data plane's queue budget and the per-pod breaker (sockops/breaker.py).
GUARD = (
    Setting(
        "--queue-budget",
        "SOCKOPS_QUEUE_BUDGET",
        "4194304",
        "bytes a receiver may hold unread on its psock before its peer sends over TCP (where flow "
        "control holds the sender back); docs/DATAPLANE.md, the queue budget",
        _queue_budget,
    ),
    Setting(
        "--proxy-uid",
        "SOCKOPS_PROXY_UID",
        "1337",
        "the mesh proxy's UID (istio-iptables -u): its sockets are accelerated without first "
        "proving how they are read; docs/DATAPLANE.md, splice readers",
        _proxy_uid,
    ),
    Setting(
        "--breaker-thresholds",
        "SOCKOPS_BREAKER_THRESHOLDS",
        "splice_reader=1,queue_over_budget=0,redirect_miss=0,early_tcp_send=0",
        "anomalies of a kind, since the pod was first seen or reset, that suspend its acceleration "
        "(kind=N,...; 0 never trips)",
        _thresholds,
    ),
    Setting(
        "--breaker-cooldown",
        "SOCKOPS_BREAKER_COOLDOWN",
        "0",
        "seconds after which a suspended pod is accelerated again (0: only a new value of its "
        "sockops.io/breaker-reset annotation resets it)",
        _non_negative_float,
    ),
)

DRAIN_TIMEOUT = Setting(
    "--drain-timeout",
    "SOCKOPS_DRAIN_TIMEOUT",
    "60",
    "seconds to wait for accelerated connections to close before unpinning",
    _positive_float,
)

SOURCES = ("kubernetes", "docker", "static")


@dataclass(frozen=True)
class AgentConfig:
    """The settings `sockops agent` runs with, typed: flags over environment over built-in defaults.

    Made once from the parsed command line (:meth:`from_namespace`), so the agent reads named,
    typed fields rather than an argparse namespace; ``None`` is a setting left empty.
    tests/test_settings.py checks that the fields are exactly the agent's settings above.
    """

    bpffs: Path
    state_file: Path | None
    cgroup: Path | None
    sockhash_size: int
    pending_size: int
    netns_size: int
    source: tuple[str, ...]
    netns: tuple[str, ...]
    node_name: str | None
    pod_name: str | None
    pod_namespace: str | None
    kubeconfig: Path | None
    docker_host: str | None
    resync: float
    late_insertion: str
    reader_hook: str
    metrics_addr: str
    if_unsupported: str
    pod_metric_labels: str
    queue_budget: int
    proxy_uid: int
    breaker_thresholds: dict[str, int]
    breaker_cooldown: float
    drain_timeout: float

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> AgentConfig:
        values = {f.name: getattr(ns, f.name) for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Every setting of `sockops agent` (cli.py adds these to its parser; AgentConfig holds their values).
AGENT_SETTINGS = (BPFFS, *SIZES, *AGENT, *GUARD, STATE_FILE, DRAIN_TIMEOUT)
