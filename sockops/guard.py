"""The splice guard: sees splice(2) on accelerated sockets (bpf/guard.bpf.c) while the agent runs.

A splice() reader never reads the psock queue, so bytes redirected to it wait forever or are read
past (docs/KERNEL-NOTES.md §3): it is the one common I/O style sockops cannot carry. Nothing in
the data plane's own hooks sees a read; a raw tracepoint on sys_enter does, on every node that
allows raw tracepoints (this one refuses fentry, kprobes and LSM programs: §7, §9). Each splice on
a socket with a psock counts as a ``splice_reader`` anomaly of its namespace, with the program's
pid and name, and the breaker (sockops/breaker.py) suspends the pod: its next connections stay on
plain TCP.

The agent attaches it, not the data plane's load: a raw tracepoint sees the whole machine, not one
cgroup, and lives only as long as the fd this object holds (an agent restart re-attaches it).
"""

from __future__ import annotations

import logging
import os

from sockops import libbpf
from sockops.errors import SockopsError

log = logging.getLogger(__name__)

PROGRAM = "sockops_splice_guard"  # loader.PROG_GUARD
TRACEPOINT = "sys_enter"


class SpliceGuard:
    """An attached guard; ``close()`` detaches it."""

    def __init__(self, prog_fd: int) -> None:
        self._fd = libbpf.raw_tracepoint_open(TRACEPOINT, prog_fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def attach(plane: object) -> SpliceGuard | None:
    """The guard on this data plane, or None (logged) when this kernel loaded no guard program
    or refuses the raw tracepoint: splice readers then stay the known limit README names."""
    programs: dict[str, object] = plane.programs  # type: ignore[attr-defined]
    prog = programs.get(PROGRAM)
    if prog is None:
        return None
    try:
        return SpliceGuard(prog.fd)  # type: ignore[attr-defined]
    except SockopsError as e:
        log.warning("splice guard unavailable", extra={"fields": {"error": str(e)}})
        return None
