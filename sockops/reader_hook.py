"""The reader hook's attachment: bpf/reader.bpf.c on the ``sys_enter`` raw tracepoint, pinned.

sock_ops gives a socket a psock only once the hook has seen how its program reads such sockets
(``recv()``, never ``splice()``: docs/DATAPLANE.md, "Splice readers"), so the hook is part of the
data plane, not of the agent: it is attached by every load through a BPF link pinned beside the
other links (``<bpffs dir>/links/sockops_reader``) and stays while no agent runs, like them.
Beside the link, the pinned ``reader_state`` map says whether the hook is attached: sock_ops only
waits for proof while it is (without the hook it vetoes nothing, and splice readers are not
known).

A raw tracepoint link cannot swap its program (no ``BPF_LINK_UPDATE``), so a new load attaches a
second link, pins it over the old pin (a rename in bpffs, atomic), then detaches the old one: for
a moment both programs run, and both only set bits that are already set or about to be.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

from sockops import layout, libbpf
from sockops.links import LINKS_DIR

PROGRAM = "sockops_reader"  # loader.PROG_READER
TRACEPOINT = "sys_enter"


def link_pin(bpffs_dir: Path) -> Path:
    return bpffs_dir / LINKS_DIR / PROGRAM


def _set_state(bpffs_dir: Path, on: bool) -> None:
    """Tell sock_ops whether the hook is attached (``reader_state``; absent before a load)."""
    try:
        fd = libbpf.obj_get(bpffs_dir / layout.MAP_READER_STATE)
    except (libbpf.NotFound, FileNotFoundError):
        return
    try:
        libbpf.map_update(fd, ctypes.c_uint32(0), ctypes.c_uint32(int(on)))
    finally:
        os.close(fd)


def attach(prog_fd: int, bpffs_dir: Path) -> str:
    """Attach the hook through a pinned link, replacing an earlier load's; says what it did."""
    pin = link_pin(bpffs_dir)
    old = None
    with contextlib.suppress(libbpf.NotFound):
        old = libbpf.obj_get(pin)
    link = libbpf.raw_tracepoint_open(TRACEPOINT, prog_fd)
    try:
        pin.parent.mkdir(exist_ok=True)
        fresh = pin.with_name(PROGRAM + "_new")  # bpffs refuses names with a dot
        with contextlib.suppress(FileNotFoundError):
            fresh.unlink()
        libbpf.obj_pin(link, fresh)
        fresh.rename(pin)
    finally:
        os.close(link)
    _set_state(bpffs_dir, True)
    if old is None:
        return "link created"
    with contextlib.suppress(libbpf.BpfCallFailed):
        libbpf.link_detach(old)
    os.close(old)
    return "link replaced"


def attached(bpffs_dir: Path) -> bool:
    """Is our pinned hook attached (its link pinned and not detached)?"""
    try:
        fd = libbpf.obj_get(link_pin(bpffs_dir))
    except (libbpf.NotFound, FileNotFoundError):
        return False
    try:
        return bool(libbpf.link_info(fd)["prog_id"])
    finally:
        os.close(fd)


def detach(bpffs_dir: Path) -> None:
    """Detach and unpin the hook. Idempotent."""
    _set_state(bpffs_dir, False)  # first: sock_ops stops waiting for proof before the hook goes
    pin = link_pin(bpffs_dir)
    with contextlib.suppress(libbpf.NotFound, FileNotFoundError):
        with contextlib.suppress(libbpf.BpfCallFailed):
            fd = libbpf.obj_get(pin)
            try:
                libbpf.link_detach(fd)
            finally:
                os.close(fd)
        pin.unlink()
