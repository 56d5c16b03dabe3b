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
from dataclasses import dataclass
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


# Loaded at import, so that a forked child (a subprocess preexec_fn) only makes the calls.
_libc = ctypes.CDLL(None, use_errno=True)


def _checked(rc: int, call: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open as ``fd`` (OSError on failure).

    The one setns(2) of the project: the agent's :func:`entered`, and the lab's pod processes
    (between fork and exec) and pod sockets (in a helper thread) all come here.
    """
    _checked(_libc.setns(fd, CLONE_NEWNET), "setns")


def unshare() -> None:
    """Give the calling process a new, empty network namespace (OSError on failure)."""
    _checked(_libc.unshare(CLONE_NEWNET), "unshare")


@contextlib.contextmanager
def entered(path: Path):
    """Run the body with this thread in another network namespace, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        try:
            setns(target)
        except OSError as e:
            raise SockopsError(f"cannot enter network namespace {path}: {e.strerror} (run as root)") from None
        try:
            yield
        finally:
            try:
                setns(home)
            except OSError:
                raise SockopsError("could not return to the original network namespace") from None
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


@dataclass(frozen=True)
class Capture:
    """Istio's REDIRECT capture as a pod's nat table has it, and which iptables backend holds it."""

    out_port: int
    in_port: int
    backend: str  # "iptables-nft" | "iptables-legacy"


# Both backends Debian's iptables package ships, the one the image's ``iptables-save`` uses first.
BACKENDS = (("iptables-nft", "iptables-nft-save"), ("iptables-legacy", "iptables-legacy-save"))


def _save_nat(path: Path, tool: str) -> str:
    try:
        return subprocess.run(
            ["nsenter", f"--net={path}", tool, "-t", "nat"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _legacy_nat_exists(path: Path) -> bool:
    """Whether the namespace has a legacy (x_tables) nat table, without creating one.

    ``iptables-legacy-save -t nat`` would instantiate the table (and load the module) in every
    pod it looks at, adding legacy nat hooks to pods that had none; /proc/net/ip_tables_names
    lists the tables that exist, as seen from the namespace of the reading thread.
    """
    try:
        with entered(path):
            names = Path("/proc/thread-self/net/ip_tables_names").read_text()
    except (OSError, SockopsError):
        return False
    return "nat" in names.split()


def parse_capture(rules: str, backend: str) -> Capture | None:
    out = re.search(r"-A ISTIO_REDIRECT .*--to-ports (\d+)", rules)
    inb = re.search(r"-A ISTIO_IN_REDIRECT .*--to-ports (\d+)", rules)
    if not out:
        return None
    return Capture(int(out.group(1)), int(inb.group(1)) if inb else 15006, backend)


def istio_capture(path: Path) -> Capture | None:
    """Istio's capture from the namespace's nat table, whichever backend wrote it, or None.

    istio-iptables picks the backend per node (nft where it can, legacy on older images), and
    neither backend's save tool shows the other's rules; reading the rules the pod really has
    (rather than assuming 15001/15006) keeps pairing right for pods whose istio-iptables ran
    with other -p / -z values.
    """
    for backend, tool in BACKENDS:
        if backend == "iptables-legacy" and not _legacy_nat_exists(path):
            continue
        found = parse_capture(_save_nat(path, tool), backend)
        if found is not None:
            return found
    return None


def istio_capture_ports(path: Path) -> tuple[int, int] | None:
    """Istio's capture ports (outbound, inbound), or None without a sidecar."""
    c = istio_capture(path)
    return (c.out_port, c.in_port) if c else None


def settings_from(path: Path, sidecar: bool | None, capture: Capture | None) -> NetnsSettings:
    """What to enable a namespace with, given the capture read from it.

    sidecar=None means "a sidecar if the capture is there"; True/False overrides (ports then default).
    """
    has_sidecar = capture is not None if sidecar is None else sidecar
    out_port, in_port = (capture.out_port, capture.in_port) if capture else (15001, 15006)
    return NetnsSettings(
        sidecar=has_sidecar, capture_out=out_port, capture_in=in_port, local_ips=local_addresses(path)
    )


def settings_for(path: Path, sidecar: bool | None = None) -> NetnsSettings:
    """What to enable a namespace with, read from the namespace itself.

    sidecar=None detects Istio's capture rules; True/False overrides (ports then default).
    """
    return settings_from(path, sidecar, istio_capture(path))
