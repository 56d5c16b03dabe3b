"""Which program goes on which hook, and how it stays there: pinned BPF links.

Every sockops program is attached through a BPF link (``BPF_LINK_CREATE``) pinned at
``<bpffs dir>/links/<program>``:

* a link on a cgroup is multi-attach: another tool's ``sock_ops`` (or ``cgroup_skb``) program on
  the same cgroup, or below it, keeps running beside ours, whatever order they came in;
* the pin keeps the link, so the program stays attached while no agent runs (restart, upgrade);
* a new agent swaps the program with ``BPF_LINK_UPDATE`` on the pinned link: atomic, the hook is
  never without a program, and it is still the same link (same id);
* removing sockops is detaching and unpinning its own links: a foreign program is never touched.

A node where an older sockops attached with ``BPF_PROG_ATTACH`` (no link, exclusive on the
cgroup) is moved to links by ``attach`` (see ``_migrate``). docs/KERNEL-NOTES.md §5 has the
kernel rules this relies on.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sockops import layout, libbpf
from sockops.errors import SockopsError

CGROUP = "cgroup"
SOCKHASH = "sockhash"
LINKS_DIR = "links"


@dataclass(frozen=True)
class Attachment:
    """One program and its hook. ``kind`` names the hook in status, doctor and metrics."""

    kind: str
    program: str  # the C function, and the program's name in the kernel (first 15 characters)
    prog_type: str  # the bcc.BPF attribute of its program type
    attach_type: int  # enum bpf_attach_type
    target: str  # CGROUP (the --cgroup directory) or SOCKHASH (the pinned sockhash)

    @property
    def kernel_name(self) -> str:
        return self.program[:15]


# In attach order: sk_msg first, so a socket that a new sock_ops program inserts finds the new
# verdict program on the map; the SYN-ACK recorder before sock_ops, whose server ends read its
# records (docs/DATAPLANE.md, "Exact pairing"). Adding a program is one line here.
ATTACHMENTS = (
    Attachment("sk_msg", "sockops_redirect", "SK_MSG", libbpf.BPF_SK_MSG_VERDICT, SOCKHASH),
    Attachment("skb_egress", "sockops_synack", "CGROUP_SKB", libbpf.BPF_CGROUP_INET_EGRESS, CGROUP),
    Attachment("sock_ops", "sockops_main", "SOCK_OPS", libbpf.BPF_CGROUP_SOCK_OPS, CGROUP),
)


def link_pin(bpffs_dir: Path, att: Attachment) -> Path:
    return bpffs_dir / LINKS_DIR / att.program


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def target_fd(att: Attachment, cgroup: Path, bpffs_dir: Path) -> Iterator[int | None]:
    """An fd for the attachment's target, None when it does not exist (nothing pinned yet)."""
    path = cgroup if att.target == CGROUP else bpffs_dir / layout.MAP_SOCKHASH
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if att.target == CGROUP else libbpf.obj_get(path)
    except (FileNotFoundError, libbpf.NotFound):
        yield None
        return
    with _fd(fd):
        yield fd


def _target_id(att: Attachment, fd: int) -> int:
    """What a link's info names as its target: the cgroup's id (its inode number in cgroupfs,
    what the kernel reports as cgroup_id on 64-bit) or the map's id."""
    return os.fstat(fd).st_ino if att.target == CGROUP else libbpf.map_info(fd)["id"]


def _name_of(prog_id: int) -> str | None:
    try:
        with _fd(libbpf.prog_fd_by_id(prog_id)) as pfd:
            return str(libbpf.prog_info(pfd)["name"])
    except libbpf.NotFound:
        return None  # unloaded between query and open


def _detach_unlinked(att: Attachment, fd: int) -> int:
    """Detach programs named like ours that were attached with BPF_PROG_ATTACH; how many.

    A program held by a link (ours or another sockops instance's) refuses BPF_PROG_DETACH
    (ENOENT on a cgroup, EBUSY on a sockmap), so only old-style attachments go.
    """
    ids, _ = libbpf.prog_query(fd, att.attach_type)
    gone = 0
    for prog_id in ids:
        if _name_of(prog_id) != att.kernel_name:
            continue
        with contextlib.suppress(libbpf.BpfCallFailed), _fd(libbpf.prog_fd_by_id(prog_id)) as pfd:
            libbpf.prog_detach(fd, pfd, att.attach_type)
            gone += 1
    return gone


def _foreign_on_sockhash(att: Attachment, fd: int) -> list[str]:
    ids, _ = libbpf.prog_query(fd, att.attach_type)
    names = {i: _name_of(i) for i in ids}
    return [f"{name} (id {i})" for i, name in names.items() if name not in (att.kernel_name, None)]


def _update_pinned(att: Attachment, pin: Path, tfd: int, prog_fd: int) -> bool:
    """Swap the program of our pinned link; False when there is no usable link to swap in."""
    try:
        link = libbpf.obj_get(pin)
    except libbpf.NotFound:
        return False
    with _fd(link):
        info = libbpf.link_info(link)
        if info["target_id"] == _target_id(att, tfd):
            try:
                libbpf.link_update(link, prog_fd)
                return True
            except libbpf.LinkDefunct:
                pass  # its cgroup or map went away, or someone detached it: make a new one
        else:
            # Pinned for another cgroup (the agent's --cgroup changed), or detached (target 0):
            # that attachment goes and a new link is made.
            with contextlib.suppress(libbpf.BpfCallFailed):
                libbpf.link_detach(link)
    pin.unlink()
    return False


def _migrate(att: Attachment, tfd: int) -> int:
    """Clear what an older sockops attached with BPF_PROG_ATTACH before our link goes on.

    On a cgroup, the old program was attached exclusively (no BPF_F_ALLOW_MULTI), and the
    kernel refuses a link beside it (EPERM), so it is detached first. From that detach until the
    link is created (two syscalls, microseconds) new connections of the cgroup get no sock_ops
    callback, so they are not inserted and run over plain TCP for their whole life: safe, a
    connection is never accelerated half way. Sockets already in the sockhash keep the programs
    their psock took at insertion, so live connections are not affected at all.

    On the sockhash nothing is detached: a link created on a map whose sk_msg program was
    attached with BPF_PROG_ATTACH replaces it atomically. A program there that is not ours is
    refused instead: a sockhash runs one sk_msg program, and ours would silently replace it.
    """
    if att.target == SOCKHASH:
        foreign = _foreign_on_sockhash(att, tfd)
        if foreign:
            raise libbpf.HookBusy(
                errno.EBUSY,
                f"the sockhash already runs another sk_msg program ({', '.join(foreign)}); a sockhash "
                f"runs one sk_msg program, and sockops' own map must run sockops_redirect: detach that "
                f"program (bpftool map show, bpftool prog show) and restart the agent",
            )
        return 0
    return _detach_unlinked(att, tfd)


_BUSY_FIX = {
    CGROUP: "another program holds the hook exclusively (attached without BPF_F_ALLOW_MULTI; "
    "`sockops doctor` names it): that tool must attach with BPF_F_ALLOW_MULTI or a BPF link. "
    "sockops never replaces it",
    SOCKHASH: "another BPF link holds sockops' sockhash: find it with bpftool link show, detach it, "
    "and restart the agent",
}


def attach(att: Attachment, prog_fd: int, cgroup: Path, bpffs_dir: Path) -> str:
    """Put one program on its hook through the pinned link; says what it did (for the log)."""
    pin = link_pin(bpffs_dir, att)
    where = f"{att.kind} on {cgroup}" if att.target == CGROUP else f"{att.kind} on the sockhash"
    with target_fd(att, cgroup, bpffs_dir) as tfd:
        if tfd is None:
            raise SockopsError(f"cannot attach {where}: the target does not exist (load first)")
        if _update_pinned(att, pin, tfd, prog_fd):
            return "link updated"
        migrated = _migrate(att, tfd)
        try:
            link = libbpf.link_create(prog_fd, tfd, att.attach_type, where, _BUSY_FIX[att.target])
        except libbpf.NotSupported:
            if att.target != SOCKHASH:
                raise
            # Kernels before 6.10 have no sockmap links. The sockhash is sockops' own map, so
            # there is nobody to coexist with: BPF_PROG_ATTACH swaps its program atomically too.
            libbpf.prog_attach(tfd, prog_fd, att.attach_type)
            return "attached with BPF_PROG_ATTACH (this kernel has no sockmap links)"
        with _fd(link):
            pin.parent.mkdir(exist_ok=True)
            try:
                libbpf.obj_pin(link, pin)
            except libbpf.BpfCallFailed:
                libbpf.link_detach(link)  # unpinned, it would go with this process anyway
                raise
    return "link created, old-style attachment replaced" if migrated else "link created"


def detach(cgroup: Path, bpffs_dir: Path) -> None:
    """Detach sockops' programs: our pinned links, and programs named like ours that an older
    sockops attached with BPF_PROG_ATTACH. Idempotent; foreign programs are never touched.

    The link is detached before it is unpinned: a process may still hold an fd of it (an agent
    that is being uninstalled), and only a detach ends the attachment at once. Detaching sk_msg
    from the sockhash also breaks the map<->program reference cycle, so the map is freed once
    unpinned and its last socket is gone.
    """
    for att in ATTACHMENTS:
        pin = link_pin(bpffs_dir, att)
        with contextlib.suppress(libbpf.NotFound, FileNotFoundError):
            with _fd(libbpf.obj_get(pin)) as link, contextlib.suppress(libbpf.LinkDefunct):
                libbpf.link_detach(link)
            pin.unlink()
        with target_fd(att, cgroup, bpffs_dir) as tfd:
            if tfd is not None:
                _detach_unlinked(att, tfd)
    with contextlib.suppress(OSError):
        (bpffs_dir / LINKS_DIR).rmdir()


def unpin(bpffs_dir: Path) -> None:
    """Remove the link pins (a link nobody else holds detaches with its last pin)."""
    for att in ATTACHMENTS:
        with contextlib.suppress(FileNotFoundError):
            link_pin(bpffs_dir, att).unlink()
    with contextlib.suppress(OSError):
        (bpffs_dir / LINKS_DIR).rmdir()


# -- what is on the hooks -----------------------------------------------------------------------------

OURS = "sockops"  # attached through this bpffs directory's link
# Named like ours, but not through this directory's link: an older sockops's BPF_PROG_ATTACH,
# or another sockops instance (another --bpffs directory) on the same hook.
OURS_UNLINKED = "sockops-other"
FOREIGN = "foreign"

_MODES = {0: "exclusive", libbpf.BPF_F_ALLOW_OVERRIDE: "override", libbpf.BPF_F_ALLOW_MULTI: "multi"}


@dataclass
class Hook:
    """The programs attached directly to one of sockops' hooks, whose they are, and the verdict."""

    kind: str
    target: str
    mode: str = ""  # cgroup: exclusive | override | multi ("" when nothing is attached)
    programs: list[dict[str, object]] = field(default_factory=list)
    exists: bool = True

    def foreign(self) -> list[dict[str, object]]:
        return [p for p in self.programs if p["owner"] == FOREIGN]

    def verdict(self) -> tuple[bool, str]:
        """(fine, sentence) for a user: can sockops and the others all run on this hook?"""
        others = self.foreign()
        names = ", ".join(f"{p['name'] or '?'} (id {p['id']})" for p in others)
        if not self.exists:
            return True, f"{self.target} does not exist yet: nothing attached"
        if self.kind == "sk_msg":
            if others:
                return False, (
                    f"another sk_msg program is on sockops' sockhash: {names}; a sockhash runs one, "
                    f"so either it or sockops_redirect is not running: detach it"
                )
            return True, "no other sk_msg program on sockops' sockhash"
        if not others:
            if any(p["owner"] == OURS_UNLINKED for p in self.programs):
                if self.mode == "exclusive":
                    return True, (
                        "sockops is attached the old way (BPF_PROG_ATTACH, exclusive): the next agent "
                        "start moves it to a link"
                    )
                return True, "another sockops instance (another --bpffs directory) also runs here"
            return True, "no other program on this hook"
        if self.mode == "multi":
            return True, (
                f"shared with {names}: fine, the hook is multi-attach (BPF links / BPF_F_ALLOW_MULTI), "
                f"every program runs on every socket"
            )
        return False, (
            f"{names} is attached without BPF_F_ALLOW_MULTI ({self.mode}): sockops cannot attach "
            f"its link beside it; that tool must attach with BPF_F_ALLOW_MULTI or a BPF link"
        )

    def to_dict(self) -> dict[str, object]:
        ok, why = self.verdict()
        return {
            "kind": self.kind,
            "target": self.target,
            "mode": self.mode,
            "programs": self.programs,
            "ok": ok,
            "verdict": why,
        }


def _our_prog_ids(att: Attachment, bpffs_dir: Path) -> set[int]:
    try:
        with _fd(libbpf.obj_get(link_pin(bpffs_dir, att))) as link:
            info = libbpf.link_info(link)
    except libbpf.NotFound:
        return set()
    return {info["prog_id"]} if info["target_id"] else set()  # target 0: detached


def _describe(prog_id: int) -> dict[str, object] | None:
    try:
        with _fd(libbpf.prog_fd_by_id(prog_id)) as pfd:
            return libbpf.prog_info(pfd)
    except libbpf.NotFound:
        return None


def hooks(cgroup: Path, bpffs_dir: Path) -> list[Hook]:
    """Every hook sockops uses, with who owns each program on it."""
    out = []
    for att in ATTACHMENTS:
        target = str(cgroup) if att.target == CGROUP else str(bpffs_dir / layout.MAP_SOCKHASH)
        hook = Hook(att.kind, target)
        out.append(hook)
        with target_fd(att, cgroup, bpffs_dir) as tfd:
            if tfd is None:
                hook.exists = False
                continue
            ids, flags = libbpf.prog_query(tfd, att.attach_type)
            ours = _our_prog_ids(att, bpffs_dir)
            if att.target == CGROUP and ids:
                hook.mode = _MODES.get(flags, str(flags))
            for prog_id in ids:
                prog = _describe(prog_id)
                if prog is None:
                    continue
                if prog_id in ours:
                    prog["owner"] = OURS
                elif prog["name"] == att.kernel_name:
                    prog["owner"] = OURS_UNLINKED
                else:
                    prog["owner"] = FOREIGN
                hook.programs.append(prog)
    return out


__all__ = [
    "ATTACHMENTS",
    "FOREIGN",
    "OURS",
    "OURS_UNLINKED",
    "Attachment",
    "Hook",
    "attach",
    "detach",
    "hooks",
    "link_pin",
    "unpin",
]
