"""`sockops demo`: one Istio-style pod on this machine, traffic with acceleration off, then on.

Everything it makes is its own and removed at the end, also on Ctrl-C: a cgroup v2 child (the
programs attach there, never to the host's root cgroup), the pod's network namespaces, Envoy and
the apps, and a scratch bpffs directory for the pinned maps. The host's own traffic is untouched.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import uuid
from pathlib import Path

from lab.cgroups import Cgroup
from lab.podlab import APP_UID, Lab
from sockops import loader, netns


def _client(pod, args: argparse.Namespace) -> dict[str, object]:
    host = pod.service_ip
    cmd = [
        sys.executable,
        "-m",
        "lab.apps",
        "client",
        "--host",
        host,
        "--port",
        "8080",
        "--connections",
        str(args.connections),
        "--requests",
        "50",
        "--sizes",
        str(args.size),
        "--duration",
        str(args.seconds),
    ]
    res = pod.run(cmd, uid=APP_UID, timeout=args.seconds + 60, text=True)
    lines = [line for line in (res.stdout or "").splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the demo client printed nothing: {res.stderr}")
    return json.loads(lines[-1])


def _wait_listening(proc) -> None:
    line = proc.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"the demo server did not start: {line!r}")


def run(args: argparse.Namespace) -> int:
    bpffs = Path("/sys/fs/bpf") / f"sockops-demo-{uuid.uuid4().hex[:8]}"
    print(
        "sockops demo: one pod with Istio's iptables rules, a real Envoy sidecar (UID 1337) and an echo app\n"
    )
    with Cgroup(prefix="sockops-demo-") as cgroup, Lab(cgroup) as lab:
        try:
            pod = lab.add_pod("demo", ip="10.244.1.10", sidecar=True)
            plane = loader.DataPlane.load(bpffs, loader.MapSizes(sockhash=4096, pending=1024, netns=16))
            plane.attach(cgroup.path)
            server = pod.popen(
                [sys.executable, "-m", "lab.apps", "server", "--port", "8080"],
                uid=APP_UID,
                stdout=subprocess.PIPE,
                text=True,
            )
            _wait_listening(server)
            path = pod.netns_path
            cookie = netns.cookie(Path(path))
            with plane.maps() as maps:
                print(
                    f"path: app -> {pod.service_ip}:8080 -> Envoy :15001 -> Envoy :15006 -> "
                    f"(from 127.0.0.6) app :8080\n"
                )
                print("phase 1: acceleration off ...", flush=True)
                off = _client(pod, args)
                before = maps.counters()
                settings = netns.settings_for(Path(path))
                maps.enable(cookie, settings)
                print(
                    f"phase 2: acceleration on (netns cookie {cookie}, sidecar detected: "
                    f"{settings.sidecar}, capture ports {settings.capture_out}/{settings.capture_in}) ...",
                    flush=True,
                )
                on = _client(pod, args)
                after = maps.counters()
            delta = {k: after[k] - before[k] for k in after}
            _print_table(off, on, delta)
            ok = not off["errors"] and not on["errors"] and not off["mismatches"] and not on["mismatches"]
            ok = ok and delta["redirected_bytes"] > 0
            print("\nresult:", "accelerated traffic, every byte intact" if ok else "FAILED (see above)")
            return 0 if ok else 1
        finally:
            loader.detach_all(cgroup.path, bpffs)
            loader.unpin(bpffs)


def _print_table(off: dict, on: dict, delta: dict) -> None:
    print()
    print(f"{'':<14}{'requests':>10}{'p50 us':>10}{'p99 us':>10}{'redirected bytes':>18}{'errors':>8}")
    for name, r, red in (("sockops off", off, 0), ("sockops on", on, delta["redirected_bytes"])):
        print(
            f"{name:<14}{r['requests']:>10}{r['p50_us']:>10}{r['p99_us']:>10}{red:>18}"
            f"{len(r['errors']) + r['mismatches']:>8}"
        )
    print(
        f"\nconnections paired: {delta['paired_origdst']} through Istio's REDIRECT "
        f"(client found from the un-NATed SYN-ACK), {delta['paired_mirror']} mirrored (127.0.0.6 -> app); "
        f"messages redirected {delta['redirected_messages']}, misses {delta['redirect_misses']}"
    )
