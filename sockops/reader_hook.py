"""The reader hook's attachment: bpf/reader.bpf.c on the ``sys_enter`` raw tracepoint, pinned.

The data plane redirects to a socket only once the hook has seen its reader call ``recv()`` and
never ``splice()`` (docs/DATAPLANE.md, "Who may be redirected to"), so the hook is part of the
data plane, not of the agent: it is attached by every load through a BPF link pinned beside the
other links (``<bpffs dir>/links/sockops_reader``) and stays while no agent runs, like them.
Without it nothing breaks: senders keep waiting for a reader the hook never reports, so every
connection whose receiver is not the sidecar's stays on plain TCP.

A raw tracepoint link cannot swap its program (no ``BPF_LINK_UPDATE``), so a new load attaches a
second link, pins it over the old pin (a rename in bpffs, atomic), then detaches the old one: for
a moment both programs run, and both only set bits that are already set or about to be.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sockops import libbpf
from sockops.links import LINKS_DIR

PROGRAM = "sockops_reader"  # loader.PROG_READER
TRACEPOINT = "sys_enter"


def link_pin(bpffs_dir: Path) -> Path:
    return bpffs_dir / LINKS_DIR / PROGRAM


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
    pin = link_pin(bpffs_dir)
    with contextlib.suppress(libbpf.NotFound, FileNotFoundError):
        with contextlib.suppress(libbpf.BpfCallFailed):
            fd = libbpf.obj_get(pin)
            try:
                libbpf.link_detach(fd)
            finally:
                os.close(fd)
        pin.unlink()
