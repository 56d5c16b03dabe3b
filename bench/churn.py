"""Control-plane benchmark: how fast an annotation change reaches the BPF maps, with 500 pods.

``python -m bench.churn [--pods 500] [--changes 1000] [--rate 50]``

What runs is the agent's real path, in one process: the official Kubernetes client (the
agent's KubernetesSource) watching a local fake API server (lab/kubeapi.py: no API server can
be installed here), the Reconciler, the /proc scan that finds each pod by its UID, and real
pinned BPF maps. Each "pod" is a process in a network namespace of its own, in a cgroup named
like the kubelet's (``pod<UID>``). The programs are loaded but not attached: only map writes are
measured, and nothing on the machine is affected.

Reported:
* initial sync: all pods listed, resolved and written;
* end-to-end latency (API change made -> netns_conf entry present/absent), measured by polling
  the map every millisecond, p50/p90/p99/max;
* the agent's own ``sockops_enforce_latency_seconds`` samples (event seen -> map written);
* the duration of one full resync over every pod (re-resolution included).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import report, stats
from lab.kubeapi import FakeKubeAPI
from sockops import loader, netns
from sockops.cgroups import find_cgroup2_root
from sockops.podresolve import find_pod_netns, index_pods
from sockops.reconciler import ACCELERATED, Reconciler, Resolver

ON = {"sockops.io/accelerate": "true"}
OFF = {"sockops.io/accelerate": "false"}


@contextmanager
def pod_processes(root: Path, count: int) -> Iterator[list[str]]:
    """``count`` sleeping processes, each in its own netns and in ``root/pod<uid>``; yields UIDs."""
    procs: list[subprocess.Popen[bytes]] = []
    uids: list[str] = []
    try:
        for _ in range(count):
            uid = str(uuid.uuid4())
            cg = root / f"pod{uid}"
            cg.mkdir()

            def enter(cg: Path = cg) -> None:
                (cg / "cgroup.procs").write_text(str(os.getpid()))
                try:
                    netns.unshare()
                except OSError:
                    os._exit(97)

            procs.append(subprocess.Popen(["sleep", "infinity"], preexec_fn=enter))
            uids.append(uid)
        yield uids
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class Recorder:
    """Observer for the reconciler: keeps the agent's own enforce latencies."""

    def __init__(self) -> None:
        self.latencies: list[float] = []

    def reconcile_error(self, source: str) -> None:
        pass

    def watch_restart(self, source: str) -> None:
        pass

    def enforced(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def reconciled(self) -> None:
        pass


def run(pods: int, changes: int, rate: float, seed: int) -> dict[str, Any]:
    from sockops.sources.kubernetes import KubernetesSource

    rng = random.Random(seed)
    tag = f"sockops-bench-churn-{secrets.token_hex(3)}"
    bpffs = Path("/sys/fs/bpf") / tag
    cg_root = find_cgroup2_root() / tag
    stop = threading.Event()
    with ExitStack() as stack:
        cg_root.mkdir()
        stack.callback(_rm_cgroups, cg_root)
        stack.callback(loader.unpin, bpffs)
        plane = loader.DataPlane.load(bpffs, loader.MapSizes(netns=max(1024, 2 * pods)))
        stack.callback(plane.bpf.close)  # type: ignore[attr-defined]
        maps = stack.enter_context(plane.maps())
        uids = stack.enter_context(pod_processes(cg_root, pods))
        api = FakeKubeAPI().start()
        stack.callback(api.close)
        api.add_namespace("bench")
        for i, uid in enumerate(uids):
            api.add_pod(f"pod-{i}", "bench", "node-a", annotations=OFF, uid=uid)
        cookies = {uid: netns.cookie(find_pod_netns(uid)) for uid in uids}  # type: ignore[arg-type]

        recorder = Recorder()
        rec = Reconciler(
            maps,
            Resolver(find_pod=find_pod_netns, index_pods=index_pods),
            ["kubernetes"],
            observer=recorder,
        )
        source = KubernetesSource("node-a", api_client=api.client())
        threads = [
            threading.Thread(target=source.run, args=(rec, stop), daemon=True),
            threading.Thread(target=rec.run, args=(stop, 3600.0), daemon=True),
        ]
        stack.callback(lambda: [t.join(10) for t in threads])
        stack.callback(stop.set)

        # initial sync: turn half of the pods on before the agent starts
        on = set(rng.sample(uids, pods // 2))
        for uid in on:
            api.update_pod(uid, annotations=ON)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        want = {cookies[u] for u in on}
        while set(maps.enabled()) != want:
            if time.monotonic() - t0 > 300:
                raise RuntimeError("initial sync did not finish in 300 s")
            time.sleep(0.005)
        initial_sync = time.monotonic() - t0
        recorder.latencies.clear()

        # churn: flip random pods at `rate` per second; a poller times each flip end to end
        e2e: list[float] = []
        timeouts = 0
        interval = 1.0 / rate
        start = time.monotonic()
        for n in range(changes):
            uid = rng.choice(uids)
            turn_on = uid not in on
            (on.add if turn_on else on.discard)(uid)
            t_change = time.monotonic()
            api.update_pod(uid, annotations=ON if turn_on else OFF)
            key = ctypes.c_uint64(cookies[uid])
            conf = maps_conf()
            deadline = t_change + 10
            while True:
                present = maps._lookup("netns_conf", key, conf)
                if present == turn_on:
                    e2e.append(time.monotonic() - t_change)
                    break
                if time.monotonic() > deadline:
                    timeouts += 1
                    break
                time.sleep(0.001)
            next_at = start + (n + 1) * interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        churn_secs = time.monotonic() - start

        # one full resync over every pod, re-resolution included
        t0 = time.monotonic()
        rec.enforce(full=True)
        full_resync = time.monotonic() - t0
        accelerated = sum(s.state == ACCELERATED for s in rec.snapshot())
    return {
        "benchmark": "control-plane churn",
        "command": " ".join(["python", "-m", "bench.churn", *sys.argv[1:]]),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "load_before": os.getloadavg(),
        },
        "pods": pods,
        "changes": changes,
        "rate_per_s": rate,
        "achieved_rate_per_s": round(changes / churn_secs, 1),
        "initial_sync_s": round(initial_sync, 3),
        "end_to_end": stats.latency_summary_ms(e2e),
        "end_to_end_timeouts": timeouts,
        "agent_enforce_latency": stats.latency_summary_ms(recorder.latencies),
        "full_resync_s": round(full_resync, 3),
        "accelerated_at_end": accelerated,
    }


def maps_conf() -> Any:
    from sockops.layout import NetnsConf

    return NetnsConf()


def _rm_cgroups(root: Path) -> None:
    for d in sorted(root.glob("pod*"), reverse=True):
        for _ in range(100):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.02)
    root.rmdir()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=500)
    p.add_argument("--changes", type=int, default=1000)
    p.add_argument("--rate", type=float, default=50.0, help="annotation changes per second")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # cleanup runs on SIGTERM as on Ctrl-C
    report.emit(run(args.pods, args.changes, args.rate, args.seed), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
