"""Pod UID -> network namespace, whatever the container runtime.

Every container runtime the kubelet drives puts a pod's processes in a cgroup whose path holds the
pod UID: ``.../kubepods/burstable/pod<uid>/<container>`` with the cgroupfs driver,
``.../kubepods-burstable-pod<uid_with_underscores>.slice/...`` with the systemd driver. So a scan
of /proc/*/cgroup finds a process of the pod without asking the runtime, and /proc/PID/ns/net is
its namespace. It needs the host's /proc (hostPID, or the host's /proc mounted in).

Processes in the host's network namespace are skipped: a host-network pod's processes must never
make the host namespace look like a pod's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def _forms(uid: str) -> tuple[str, str]:
    u = uid.strip().lower()
    return u, u.replace("-", "_")


def _host_netns(proc: Path) -> tuple[int, int] | None:
    # The agent runs with hostNetwork, so its own namespace is the host's (PID 1's may not even
    # be readable from inside a container).
    try:
        st = (proc / "self" / "ns" / "net").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def index_pods(uids: Iterable[str], proc: Path = PROC) -> dict[str, Path]:
    """One pass over /proc: pod UID -> /proc/PID/ns/net of a process of that pod, for those found."""
    wanted = {form: uid for uid in uids if uid for form in _forms(uid)}
    if not wanted:
        return {}
    host = _host_netns(proc)
    found: dict[str, Path] = {}
    with os.scandir(proc) as entries:
        for entry in entries:
            if _match(entry, wanted, found, host) and len(found) == len(set(wanted.values())):
                break
    return found


def _match(entry: os.DirEntry[str], wanted: dict[str, str], found: dict[str, Path], host: object) -> bool:
    """Record the pod of one /proc entry in ``found``; True when it added one."""
    if not entry.name.isdigit():
        return False
    try:
        text = Path(entry.path, "cgroup").read_text().lower()
    except OSError:
        return False  # the process went away while we looked
    for form, uid in wanted.items():
        if uid in found or form not in text:
            continue
        ns = Path(entry.path, "ns", "net")
        try:
            st = ns.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != host:
            found[uid] = ns
            return True
    return False


def find_pod_netns(uid: str, proc: Path = PROC) -> Path | None:
    """The namespace of one pod, or None when no process of it is running (yet)."""
    return index_pods([uid], proc).get(uid)
