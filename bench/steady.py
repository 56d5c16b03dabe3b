"""Steady-state cost of the agent on a busy node: CPU of the real agent process, from its cgroup.

``python -m bench.steady [--pods 110] [--seconds 180] [--warmup 45] [--code DIR]``

The issue's setting: 110 pods on the node (Kubernetes' default per-node limit), a Prometheus
scrape every 15 s and a kubelet health check every 10 s (``/healthz`` and ``/readyz``), nothing
changing. What runs is ``sockops agent --source kubernetes`` as a process of its own, in a cgroup
of its own (so ``cpu.stat`` counts it and its children, nsenter and iptables-save included),
against the fake API server of the tests (lab/kubeapi.py) with the node's pods and 2,000 pods of
other nodes in 20 namespaces. Every pod is a process in its own network namespace, in a cgroup
named like the kubelet's (``pod<UID>``), with an address and Istio's two REDIRECT chains in its
nat table, and opted in; the programs are attached to the benchmark's own cgroup, never the root.

Reported: the agent's CPU over ``--seconds`` after ``--warmup`` (in mCPU, 1000 = one core), the
start-up cost, and the resident memory peak (VmHWM). ``--code DIR`` runs the agent from another checkout (its
``sockops`` package), to measure a before/after with the same harness.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import report
from bench.churn import _interrupt, _rm_cgroups, pod_processes
from bench.machine import cpu_model
from lab.kubeapi import FakeKubeAPI
from sockops import loader
from sockops.cgroups import find_cgroup2_root

ON = {"sockops.io/accelerate": "true", "sidecar.istio.io/status": "{}"}
ISTIO_NAT = """*nat
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
COMMIT
"""


def cpu_usec(cg: Path) -> int:
    for line in (cg / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    raise RuntimeError(f"{cg}/cpu.stat has no usage_usec")


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
            return r.status
    except OSError:
        return 0


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: fake, user: {}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
        "current-context: fake\n"
    )
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    pods: int, seconds: float, warmup: float, code: Path | None, scrape: float, probe: float
) -> dict[str, Any]:
    tag = f"sockops-bench-steady-{secrets.token_hex(3)}"
    bpffs = Path("/sys/fs/bpf") / tag
    root = find_cgroup2_root()
    pods_cg, agent_cg = root / tag, root / f"{tag}-agent"
    workdir = Path("/tmp") / tag
    with ExitStack() as stack:
        workdir.mkdir()
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        pods_cg.mkdir()
        stack.callback(_rm_cgroups, pods_cg)
        agent_cg.mkdir()
        stack.callback(agent_cg.rmdir)
        stack.callback(loader.unpin, bpffs)
        stack.callback(loader.detach_all, pods_cg, bpffs)
        uids = stack.enter_context(pod_processes(pods_cg, pods))
        for n, pid_file in enumerate(sorted(pods_cg.glob("pod*/cgroup.procs"))):
            pid = pid_file.read_text().split()[0]
            subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "iptables-nft-restore"],
                           input=ISTIO_NAT, text=True, check=True, timeout=30)  # fmt: skip
            # a pod address, as the CNI gives one (on lo: no veth needed, nothing routes to it)
            ip = f"10.244.{200 + n // 250}.{n % 250 + 1}/32"
            subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "addr", "add", ip, "dev", "lo"],
                           check=True, timeout=30)  # fmt: skip
        api = FakeKubeAPI().start()
        stack.callback(api.close)
        for n in range(20):
            api.add_namespace(f"ns-{n}")
        for i, uid in enumerate(uids):
            api.add_pod(
                f"pod-{i}",
                f"ns-{i % 20}",
                "node-a",
                annotations=ON,
                uid=uid,
                containers=("app", "istio-proxy"),
            )
        for i in range(2000):
            api.add_pod(f"other-{i}", f"ns-{i % 20}", f"node-{i % 50 + 1}", annotations=ON)

        port = _free_port()
        env = dict(os.environ)
        if code is not None:
            env["PYTHONPATH"] = str(code)
        argv = [sys.executable, "-m", "sockops.cli", "agent", "--source", "kubernetes",
                "--node-name", "node-a", "--kubeconfig", str(_kubeconfig(workdir / "kubeconfig", api.url)),
                "--cgroup", str(pods_cg), "--bpffs", str(bpffs), "--metrics-addr", f"127.0.0.1:{port}",
                "--state-file", str(workdir / "state.json"), "--log-format", "json"]  # fmt: skip
        log = open(workdir / "agent.log", "wb")  # noqa: SIM115 (closed by the stack)
        stack.callback(log.close)

        def enter_cgroup() -> None:
            (agent_cg / "cgroup.procs").write_text(str(os.getpid()))

        t_start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, preexec_fn=enter_cgroup, cwd=workdir)

        def stop_agent() -> None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        stack.callback(stop_agent)
        base = f"http://127.0.0.1:{port}"
        while get(base + "/readyz") != 200:
            if proc.poll() is not None or time.monotonic() - t_start > 300:
                raise RuntimeError(f"agent not ready: see {workdir / 'agent.log'}")
            time.sleep(0.2)
        ready_s = time.monotonic() - t_start
        startup_cpu_s = cpu_usec(agent_cg) / 1e6

        def load(until: float) -> dict[str, int]:
            """Scrapes and probes at their periods until ``until`` (monotonic)."""
            next_scrape = next_probe = time.monotonic()
            counts = {"scrapes": 0, "probes": 0, "failed": 0}
            while (now := time.monotonic()) < until:
                if now >= next_scrape:
                    counts["scrapes"] += 1
                    counts["failed"] += get(base + "/metrics") != 200
                    next_scrape += scrape
                if now >= next_probe:
                    counts["probes"] += 1
                    counts["failed"] += get(base + "/healthz") != 200
                    counts["failed"] += get(base + "/readyz") != 200
                    next_probe += probe
                time.sleep(max(0.0, min(next_scrape, next_probe, until) - time.monotonic()))
            return counts

        load(time.monotonic() + warmup)
        u0, t0 = cpu_usec(agent_cg), time.monotonic()
        counts = load(t0 + seconds)
        u1, t1 = cpu_usec(agent_cg), time.monotonic()
        hwm = next(
            (line.split()[1] for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
             if line.startswith("VmHWM:")),
            "0",
        )  # fmt: skip
        state = json.loads((workdir / "state.json").read_text())
        accelerated = sum(w["state"] == "accelerated" for w in state["workloads"])
    return {
        "benchmark": "agent steady state",
        "command": " ".join(["python", "-m", "bench.steady", *sys.argv[1:]]),
        "code": str(code) if code else "this checkout",
        "machine": {
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "load_before": os.getloadavg(),
        },
        "pods_on_node": pods,
        "accelerated": accelerated,
        "scrape_every_s": scrape,
        "probe_every_s": probe,
        "ready_after_s": round(ready_s, 2),
        "startup_cpu_s": round(startup_cpu_s, 2),
        "measured_s": round(t1 - t0, 1),
        "agent_mcpu": round((u1 - u0) / 1e3 / (t1 - t0), 2),
        "requests": counts,
        "resident_peak_mib": round(int(hwm) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.steady", description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=110)
    p.add_argument("--seconds", type=float, default=180.0, help="measured interval")
    p.add_argument("--warmup", type=float, default=45.0, help="after ready, before measuring")
    p.add_argument("--scrape", type=float, default=15.0, help="seconds between /metrics scrapes")
    p.add_argument("--probe", type=float, default=10.0, help="seconds between /healthz + /readyz probes")
    p.add_argument("--code", type=Path, default=None, help="run the agent from this checkout")
    p.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # cleanup runs on SIGTERM as on Ctrl-C
    report.emit(run(args.pods, args.seconds, args.warmup, args.code, args.scrape, args.probe), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
