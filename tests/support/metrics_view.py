"""AgentView implementations for tests: one over a real data plane, one over fake maps.

The agent implements :class:`sockops.metrics.AgentView` itself; these stand-ins let the metrics
tests (and the alert and dashboard tests, which check names against a real scrape) run without
the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Plane
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lab.podlab import Pod
from sockops import libbpf, links
from sockops.loader import programs_attached
from sockops.maps import MapSizes, PinnedMaps
from support.podtraffic import popen_piped

PAIR_TRAFFIC = Path(__file__).resolve().parent / "pair_traffic.py"


@dataclass
class PlaneView:
    """The view of an agent running a real data plane: maps opened by path at each scrape."""

    bpffs_dir: Path
    cgroup: Path
    sizes: MapSizes
    labels: dict[int, tuple[str, str]] = field(default_factory=dict)
    pending: int = 0
    supported: bool = True

    @contextlib.contextmanager
    def open_maps(self) -> Iterator[PinnedMaps | None]:
        if not self.bpffs_dir.exists():
            yield None
            return
        with PinnedMaps(self.bpffs_dir) as maps:
            yield maps

    def pod_labels(self) -> dict[int, tuple[str, str]]:
        return dict(self.labels)

    def pods_accelerated(self) -> int:
        return len(self.labels)

    def pods_pending(self) -> int:
        return self.pending

    def programs_attached(self) -> dict[str, bool]:
        return programs_attached(self.cgroup, self.bpffs_dir)

    def kernel_supported(self) -> bool:
        return self.supported

    def map_sizes(self) -> MapSizes:
        return self.sizes

    def breakers(self) -> dict[tuple[str, str], bool]:
        """Every labelled pod accelerated, none suspended (the agent's reconciler decides that)."""
        return dict.fromkeys(self.labels.values(), False)


def plane_view(plane: Plane, sizes: MapSizes, labels: dict[int, tuple[str, str]]) -> PlaneView:
    return PlaneView(bpffs_dir=plane.bpffs_dir, cgroup=plane.cgroup, sizes=sizes, labels=dict(labels))


def detach_sock_ops(bpffs_dir: Path) -> None:
    """Detach sockops' sock_ops link (as another admin could); sk_msg stays on the map."""
    (att,) = [a for a in links.ATTACHMENTS if a.kind == "sock_ops"]
    fd = libbpf.obj_get(links.link_pin(bpffs_dir, att))
    try:
        libbpf.link_detach(fd)
    finally:
        os.close(fd)


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(registry: Any) -> Samples:
    """generate_latest() parsed back: sample name -> {sorted label items: value}."""
    out: Samples = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


class PairTraffic:
    """tests/support/pair_traffic.py in a pod (see its docstring)."""

    def __init__(self, pod: Pod, connections: int, size: int, rounds: int, hold: bool) -> None:
        argv = [
            sys.executable, str(PAIR_TRAFFIC), "--connections", str(connections),
            "--size", str(size), "--rounds", str(rounds),
        ]  # fmt: skip
        if hold:
            argv.append("--hold")
        self.proc = popen_piped(pod, argv)

    def held(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                pytest.fail(f"pair_traffic did not hold its connections within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"pair_traffic exited early: {self.proc.communicate(timeout=5)}")
        return json.loads(line)

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate("go\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"pair_traffic hung for {timeout}s: {self.proc.communicate()}")
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])


def run_pairs(pod: Pod, connections: int, size: int, rounds: int) -> dict[str, Any]:
    t = PairTraffic(pod, connections, size, rounds, hold=False)
    return t.finish()


def real_scrape(plane: Plane, pod: Pod) -> Samples:
    """A scrape of a real agent-like registry after real accelerated traffic in ``pod``: every
    family the agent can export has samples (per-pod ones included), so the names in it are the
    names alerts and dashboards may use."""
    from sockops.metrics import build_registry

    cookie = plane.enable(pod)
    registry, metrics = build_registry(plane_view(plane, MapSizes(), {cookie: ("shop", pod.name)}))
    metrics.init_source("kubernetes")
    metrics.enforce_latency.observe(0.02)
    metrics.last_reconcile.set_to_current_time()
    res = run_pairs(pod, 2, 100, 2)
    assert res["mismatches"] == 0
    return scrape(registry)
