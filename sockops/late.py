"""Late insertion: accelerating connections that were established before their pod was enabled.

A socket joins the sockhash at its handshake or, without this, never: an upstream keep-alive pool,
an HTTP/2 or gRPC channel opened before the opt-in (or before the agent started) would stay on
TCP for its whole life. bpf/late.bpf.c is an iterator program that visits the established sockets
of a namespace and lets the safe ones join; each direction of a joined connection moves from TCP
to redirect only once the receiver has read every byte sent over TCP (docs/DATAPLANE.md, "Late
insertion").

A pass has two steps, because the two ends of a connection may sit in two namespaces: first every
enabled namespace is visited in insert mode, then every one in settle mode, which switches a
direction to redirect once its receiver has caught up and takes out the sockets whose peer did not
join. A direction whose receiver is still reading TCP bytes at that moment switches at a later
pass. The kernel walks the sockets of the namespace that *creates* the iterator, so each visit
starts inside the namespace (netns.entered) and reads outside it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sockops import libbpf, netns
from sockops.errors import SockopsError

log = logging.getLogger(__name__)

PROGRAM = "bpf_iter__tcp"  # BPF_ITER(tcp) in bpf/late.bpf.c
MODE_MAP = "late_mode"
MODE_INSERT, MODE_SETTLE = 0, 1  # LATE_INSERT / LATE_SETTLE in bpf/late.bpf.c


@dataclass(frozen=True)
class PassResult:
    """What one pass visited; counts of what joined or left are the data plane's own counters."""

    namespaces: int
    failed: tuple[str, ...] = ()  # namespaces that could not be entered (a pod that just went away)


class LateInserter:
    """Runs late-insertion passes through an iterator link this object owns.

    The link is not pinned: it only lives while the agent that runs passes does, and a new agent
    makes its own. Passes are serialized (one lock), so the steps of two passes never interleave.
    """

    def __init__(self, prog_fd: int, mode_table: object) -> None:
        self._mode = mode_table
        self._lock = threading.Lock()
        self._link = libbpf.link_create(
            prog_fd, 0, libbpf.BPF_TRACE_ITER, "the tcp iterator", "this kernel has no bpf_iter/tcp (5.9)"
        )

    def close(self) -> None:
        with self._lock:
            if self._link >= 0:
                os.close(self._link)
                self._link = -1

    def run(self, namespaces: Mapping[int, Path]) -> PassResult:
        """One pass over the enabled namespaces ({netns cookie: path}). Never raises for a
        namespace that vanished: the pass goes on with the others (a pod can die at any time)."""
        with self._lock:
            if self._link < 0:
                raise SockopsError("late insertion was closed")
            failed: list[str] = []
            visited = 0
            for mode in (MODE_INSERT, MODE_SETTLE):
                self._set_mode(mode)
                for path in namespaces.values():
                    try:
                        self._visit(path)
                        visited += mode == MODE_INSERT
                    except (OSError, SockopsError) as e:
                        if mode == MODE_INSERT:
                            failed.append(f"{path}: {e}")
            self._set_mode(MODE_INSERT)
            return PassResult(visited, tuple(failed))

    def _set_mode(self, mode: int) -> None:
        self._mode[ctypes.c_int(0)] = ctypes.c_uint32(mode)  # type: ignore[index]

    def _visit(self, path: Path) -> None:
        with netns.entered(path):
            fd = libbpf.iter_create(self._link)
        try:
            while os.read(fd, 1 << 16):
                pass  # the program prints nothing; each read() runs it over a batch of sockets
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def inserter(plane: object) -> LateInserter | None:
    """The data plane's late inserter, or None (logged) when this kernel refused the iterator:
    connections are then accelerated from their handshake only, as before."""
    programs: dict[str, object] = plane.programs  # type: ignore[attr-defined]
    prog = programs.get(PROGRAM)
    if prog is None:
        return None
    try:
        return LateInserter(prog.fd, plane.bpf[MODE_MAP])  # type: ignore[attr-defined]
    except SockopsError as e:
        log.warning("late insertion unavailable", extra={"fields": {"error": str(e)}})
        return None
