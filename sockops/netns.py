"""Network namespace identity: from a name, path or PID to the netns cookie the BPF keys use.

The kernel's netns cookie (SO_NETNS_COOKIE, the value bpf_get_netns_cookie() returns) is unique
for the life of the system, unlike an inode number that can be reused after a pod is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import subprocess
from pathlib import Path

from sockops.errors import NetnsNotFound, SockopsError
from sockops.layout import NetnsSettings

SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


def resolve(netns: str | None = None, pid: int | None = None) -> Path:
    """A namespace file for a name (ip netns), a path, or a process."""
    if pid is not None:
        path = Path(f"/proc/{pid}/ns/net")
        if not path.exists():
            raise NetnsNotFound(f"process {pid} not found: pass the PID of a process in the pod")
        return path
    if not netns:
        raise NetnsNotFound("name a network namespace with --netns NAME_OR_PATH or --pid PID")
    path = Path(netns) if "/" in netns else NETNS_RUN_DIR / netns
    if not path.exists():
        raise NetnsNotFound(f"network namespace {netns} not found (looked at {path}): see ip netns list")
    return path


@contextlib.contextmanager
def entered(path: Path):
    """Run the body with this thread in another network namespace, then come back."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SockopsError(f"cannot enter network namespace {path}: {os.strerror(err)} (run as root)")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise SockopsError("could not return to the original network namespace")
    finally:
        os.close(target)
        os.close(home)


def cookie(path: Path) -> int:
    """The netns cookie: a socket made inside the namespace reports it."""
    with entered(path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        raw = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def own_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def local_addresses(path: Path) -> tuple[str, ...]:
    """The namespace's own global addresses (a pod's IPs): clients connecting to them may pair."""
    from pyroute2 import IPRoute

    out: list[str] = []
    with entered(path), IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS")
            if addr and msg["scope"] == 0 and not addr.startswith("127.") and addr != "::1":
                out.append(addr)
    return tuple(out)


def istio_capture_ports(path: Path) -> tuple[int, int] | None:
    """Istio's capture ports from the namespace's nat table, or None without a sidecar.

    Reading the rules the pod really has (rather than assuming 15001/15006) keeps pairing right
    for pods whose istio-iptables ran with other -p / -z values.
    """
    try:
        rules = subprocess.run(
            ["nsenter", f"--net={path}", "iptables-save", "-t", "nat"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = re.search(r"-A ISTIO_REDIRECT .*--to-ports (\d+)", rules)
    inb = re.search(r"-A ISTIO_IN_REDIRECT .*--to-ports (\d+)", rules)
    if not out:
        return None
    return int(out.group(1)), int(inb.group(1)) if inb else 15006


def settings_for(path: Path, sidecar: bool | None = None) -> NetnsSettings:
    """What to enable a namespace with, read from the namespace itself.

    sidecar=None detects Istio's capture rules; True/False overrides (ports then default).
    """
    capture = istio_capture_ports(path)
    has_sidecar = capture is not None if sidecar is None else sidecar
    out_port, in_port = capture or (15001, 15006)
    return NetnsSettings(
        sidecar=has_sidecar, capture_out=out_port, capture_in=in_port, local_ips=local_addresses(path)
    )
