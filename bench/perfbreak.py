"""Where the CPU goes in the both-sidecars path, sockops off vs on (``perf record`` system-wide).

This answers the question a missed target raises: how much of a request's CPU is in the kernel
paths sockops can remove at all? Samples are classified by process role (Envoy, nginx, the wrk
load generator, anything else on the machine) and by user vs kernel; kernel samples of the mesh's
own processes are further split into groups by symbol name. The runs here are extra runs, not the
measured ones, so perf's own overhead never touches the reported latencies.

Envoy names its worker threads ``wrk:worker_N`` (not to be confused with the wrk load generator,
whose threads are called ``wrk``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

# Kernel symbol groups by name prefix; the first group with a matching prefix wins.
KERNEL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "sockmap (tcp_bpf, sk_msg, BPF)",
        ("tcp_bpf", "sk_msg", "__sk_msg", "sk_psock", "bpf_", "__bpf", "sock_map", "sock_hash"),
    ),
    ("netfilter / conntrack / NAT", ("nf_", "__nf_", "ipt_", "ip6t_", "nft_", "iptable_", "nat_", "xt_")),
    (
        "veth / bridge / device",
        (
            "veth",
            "br_",
            "__br_",
            "dev_",
            "__dev_",
            "netif_",
            "__netif_",
            "net_rx",
            "napi",
            "__napi",
            "process_backlog",
        ),
    ),
    (
        "TCP/IP stack",
        (
            "tcp_",
            "__tcp",
            "ip_",
            "__ip",
            "ipv4",
            "inet",
            "__inet",
            "sk_",
            "__sk_",
            "skb",
            "__skb",
            "kfree_skb",
            "sock_",
            "__sock",
            "lock_sock",
            "release_sock",
            "alloc_skb",
            "__alloc_skb",
        ),
    ),
    (
        "epoll / syscalls / copies",
        (
            "ep_",
            "do_epoll",
            "__x64_sys",
            "do_syscall",
            "entry_",
            "syscall",
            "fput",
            "fget",
            "fdget",
            "__fget",
            "vfs_",
            "do_writev",
            "do_readv",
            "do_iter",
            "import_iovec",
            "_copy_",
            "__check_object",
            "copy_",
        ),
    ),
    (
        "scheduler / wakeups / IPIs / locks",
        (
            "asm_sysvec",
            "sysvec",
            "__schedule",
            "schedule",
            "try_to_wake",
            "ttwu",
            "enqueue",
            "dequeue",
            "__enqueue",
            "__dequeue",
            "update_",
            "__update",
            "pick_",
            "switch_",
            "__switch",
            "psi_",
            "finish_task",
            "set_next",
            "put_prev",
            "select_task",
            "wake_",
            "__wake",
            "native_",
            "pv_",
            "__pv",
            "__raw_callee",
            "_raw_spin",
            "raw_spin",
            "read_tsc",
            "vcpu",
            "irq",
            "__irq",
        ),
    ),
)


def kernel_group(symbol: str) -> str:
    return next((name for name, prefixes in KERNEL_GROUPS if symbol.startswith(prefixes)), "other kernel")


def available() -> bool:
    """True where ``perf`` can sample here (a guest without a PMU or a strict paranoid level cannot)."""
    perf = shutil.which("perf")
    if perf is None:
        return False
    res = subprocess.run(
        [perf, "stat", "-e", "task-clock", "true"], capture_output=True, timeout=20, check=False
    )
    return res.returncode == 0


def _role(comm: str) -> str:
    if comm.startswith("wrk:worker") or comm in (
        "envoy",
        "main_thread",
        "dog:main_thread",
        "dog:workers_gua",
    ):
        return "envoy"
    if comm == "nginx":
        return "nginx"
    if comm == "wrk":
        return "loadgen"
    return "other"


def _report(data: Path, sort: str, extra: list[str]) -> list[tuple[float, list[str]]]:
    argv = [
        "perf",
        "report",
        "-i",
        str(data),
        "--no-children",
        "-g",
        "none",
        "--sort",
        sort,
        "--stdio",
        *extra,
    ]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    rows = []
    for line in res.stdout.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"\s*([\d.]+)%\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2).split()))
    return rows


def breakdown(data: Path) -> dict[str, Any]:
    """Shares (percent of all samples) by role x user/kernel, and the mesh's kernel time by group."""
    roles: dict[str, float] = defaultdict(float)
    mesh_comms: set[str] = set()
    for pct, fields in _report(data, "comm,dso", []):
        comm, dso = fields[0], fields[-1]
        role = _role(comm)
        if role != "other":
            mesh_comms.add(comm)
        roles[f"{role} {'kernel' if dso == '[kernel.kallsyms]' else 'user'}"] += pct
    groups: dict[str, float] = defaultdict(float)
    if mesh_comms:
        extra = ["--comms", ",".join(sorted(mesh_comms)), "--dsos", "[kernel.kallsyms]"]
        for pct, fields in _report(data, "sym", extra):
            sym = fields[-1]
            groups[kernel_group(sym)] += pct
    return {"by_role": dict(sorted(roles.items())), "mesh_kernel_by_group": dict(sorted(groups.items()))}


def record(seconds: float, frequency: int = 499) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a system-wide ``perf record`` for ``seconds``; the caller waits and then calls
    :func:`breakdown` on the returned path (in a temp directory the caller removes)."""
    out = Path(tempfile.mkdtemp(prefix="sockops-bench-perf-")) / "perf.data"
    proc = subprocess.Popen(
        ["perf", "record", "-a", "-F", str(frequency), "-o", str(out), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, out
