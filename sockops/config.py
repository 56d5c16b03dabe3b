"""The agent's settings: one table of flags, each with its environment variable and default.

Defined once so the command line, the DaemonSet's env and the tests that check the manifests
against the code all read the same names: renaming a setting here and not in daemonset/ fails a
test.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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

    def add_to(self, p: argparse.ArgumentParser) -> None:
        raw = os.environ.get(self.env, self.default)
        if self.repeatable:
            default: Any = [self.type(v) for v in raw.split(",") if v.strip()]
            p.add_argument(
                self.flag,
                action="append",
                type=self.type,
                default=None,
                help=f"{self.help} (repeatable; env {self.env}, comma-separated; default {raw or 'none'})",
            )
            p.set_defaults(**{self.dest: default})
            return
        p.add_argument(
            self.flag,
            type=self.type,
            choices=self.choices,
            default=self.type(raw) if raw != "" else None,
            help=f"{self.help} (env {self.env}; default {raw or 'none'})",
        )


def _path(v: str) -> Path:
    return Path(v)


def _positive_int(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{v} must be a positive integer")
    return n


def _positive_float(v: str) -> float:
    n = float(v)
    if not n > 0:
        raise argparse.ArgumentTypeError(f"{v} must be a positive number of seconds")
    return n


BPFFS = Setting(
    "--bpffs", "SOCKOPS_BPFFS", "/sys/fs/bpf/sockops", "bpffs directory of the pinned maps", _path
)
LOG_FORMAT = Setting(
    "--log-format", "SOCKOPS_LOG_FORMAT", "text", "log line format", choices=("text", "json")
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
        type=str,
    ),
    CGROUP,
    Setting(
        "--netns", "SOCKOPS_STATIC_NETNS", "", "static source: a namespace to accelerate", repeatable=True
    ),
    Setting(
        "--node-name", "NODE_NAME", "", "kubernetes source: this node's name (downward API spec.nodeName)"
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
        "--metrics-addr", "SOCKOPS_METRICS_ADDR", "0.0.0.0:9876", "address of /metrics, /healthz, /readyz"
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

SOURCES = ("kubernetes", "docker", "static")
