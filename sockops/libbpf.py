"""The bpf(2) layer: Debian's libbpf.so.1 through ctypes, errno turned into exceptions with the fix.

bcc 0.26 exposes no query, link or detach API, and packing ``union bpf_attr`` by hand ties the
code to one architecture's syscall number and to offsets nobody checks. libbpf (libbpf1, which
python3-bpfcc depends on) owns both: it picks the syscall for the machine and builds the
attributes from the kernel's UAPI headers, so this module only declares the C signatures and
the first fields of the info structs it reads (the kernel copies as many bytes as we ask for).

Every function raises ``BpfCallFailed`` (an ``OSError`` with ``.errno``) or one of its
subclasses, with the call, the object and what to do in the message.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from pathlib import Path

from sockops.errors import SockopsError

# enum bpf_attach_type values this project uses (include/uapi/linux/bpf.h; stable ABI).
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_MSG_VERDICT = 7
BPF_TRACE_ITER = 28

# attach_flags a cgroup reports for a hook (BPF_PROG_QUERY): 0 is "exclusive", which forbids
# any other program on the hook and any program below it in the hierarchy.
BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1

# enum bpf_link_type values of the links sockops makes.
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_SOCKMAP = 14

_MAX_PROGS = 64  # programs per hook read by one query; the kernel's own cgroup limit is 64


class BpfCallFailed(SockopsError, OSError):
    """A libbpf call failed; ``errno`` is the kernel's answer."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.args = (f"{message}: {os.strerror(err)} (errno {err})",)

    def __str__(self) -> str:
        return self.args[0]


class NotFound(BpfCallFailed):
    """ENOENT: the id, pin or attachment does not exist (anymore)."""


class HookBusy(BpfCallFailed):
    """EPERM/EBUSY/EEXIST on an attach: another program holds the hook exclusively."""


class LinkDefunct(BpfCallFailed):
    """ENOLINK: a pinned link whose cgroup or map is gone or that was detached."""


class NotPermitted(BpfCallFailed):
    """EPERM/EACCES outside an attach: the caller lacks CAP_BPF/CAP_SYS_ADMIN."""


class NotSupported(BpfCallFailed):
    """EINVAL/EOPNOTSUPP on a link call: the kernel has no link for this hook."""


def _check(ret: int, what: str, fix: str = "", attach: bool = False) -> int:
    """``ret`` itself when the call succeeded; libbpf 1.x returns -errno, which becomes the
    exception a caller can act on."""
    if ret >= 0:
        return ret
    _raise(ret, what, fix, attach)
    raise AssertionError("unreachable")


def _raise(ret: int, what: str, fix: str, attach: bool = False) -> None:
    """Map a failed call's errno to the exception a caller can act on."""
    err = -ret if ret < 0 else (ctypes.get_errno() or errno.EIO)
    message = f"{what} failed" + (f"; {fix}" if fix else "")
    if err == errno.ENOENT:
        raise NotFound(err, message)
    if err == errno.ENOLINK:
        raise LinkDefunct(err, message)
    if attach and err in (errno.EPERM, errno.EBUSY, errno.EEXIST):
        raise HookBusy(err, message)
    if err in (errno.EPERM, errno.EACCES):
        raise NotPermitted(err, f"{what} failed: run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    if err in (errno.EINVAL, errno.EOPNOTSUPP):
        raise NotSupported(err, message)
    raise BpfCallFailed(err, message)


@functools.cache
def lib() -> ctypes.CDLL:
    """libbpf.so.1 with the signatures of the calls used here."""
    try:
        so = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise SockopsError(
            f"libbpf.so.1 not found ({e}): apt-get install libbpf1 (python3-bpfcc depends on it)"
        ) from e
    i, u32, p = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p
    pu32, s = ctypes.POINTER(u32), ctypes.c_char_p
    for name, argtypes in {
        "bpf_obj_get": [s],
        "bpf_obj_pin": [i, s],
        "bpf_obj_get_info_by_fd": [i, p, pu32],
        "bpf_prog_get_fd_by_id": [u32],
        "bpf_link_get_fd_by_id": [u32],
        "bpf_prog_query": [i, i, u32, pu32, pu32, pu32],
        "bpf_prog_attach": [i, i, i, ctypes.c_uint],
        "bpf_prog_detach2": [i, i, i],
        "bpf_link_create": [i, i, i, p],
        "bpf_link_update": [i, i, p],
        "bpf_link_detach": [i],
        "bpf_iter_create": [i],
        "bpf_raw_tracepoint_open": [s, i],
        "bpf_map_update_elem": [i, p, p, ctypes.c_uint64],
    }.items():
        fn = getattr(so, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return so


# -- objects in bpffs -------------------------------------------------------------------------------


def obj_get(path: Path) -> int:
    """An fd for a pinned map, program or link."""
    return _check(
        lib().bpf_obj_get(str(path).encode()),
        f"opening the pin {path}",
        "is bpffs mounted and the agent started? (run as root)",
    )


def obj_pin(fd: int, path: Path) -> None:
    _check(
        lib().bpf_obj_pin(fd, str(path).encode()),
        f"pinning at {path}",
        "the directory must be on a bpf filesystem and the name free",
    )


# -- ids and info -------------------------------------------------------------------------------------


def prog_fd_by_id(prog_id: int) -> int:
    return _check(
        lib().bpf_prog_get_fd_by_id(prog_id),
        f"opening program id {prog_id}",
        "it may have been unloaded meanwhile",
    )


def link_fd_by_id(link_id: int) -> int:
    return _check(
        lib().bpf_link_get_fd_by_id(link_id),
        f"opening link id {link_id}",
        "it may have been released meanwhile",
    )


class _ProgInfo(ctypes.Structure):
    """The first fields of struct bpf_prog_info, up to the name."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


class _MapInfo(ctypes.Structure):
    """The first fields of struct bpf_map_info."""

    # Five __u32 in the kernel's order (include/uapi/linux/bpf.h).
    _fields_ = tuple(
        (name, ctypes.c_uint32) for name in ("type", "id", "key_size", "value_size", "max_entries")
    )


class _LinkTarget(ctypes.Union):
    _fields_ = (
        ("cgroup_id", ctypes.c_uint64),  # cgroup link: cgroup_id u64, attach_type u32
        ("map_id", ctypes.c_uint32),  # sockmap link: map_id u32, attach_type u32
    )


class _LinkInfo(ctypes.Structure):
    """The first fields of struct bpf_link_info: type, id, prog_id and the target's id."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("target", _LinkTarget),
    )


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(
        lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        f"reading the info of {what} fd {fd}",
        "",
    )


def prog_info(fd: int) -> dict[str, object]:
    """Id, name (the kernel keeps 15 characters) and tag (a hash of the instructions)."""
    info = _ProgInfo()
    _info(fd, info, "program")
    return {"id": info.id, "tag": bytes(info.tag).hex(), "name": info.name.decode(errors="replace")}


def map_info(fd: int) -> dict[str, int]:
    """Type, id, key/value sizes and capacity of a map."""
    info = _MapInfo()
    _info(fd, info, "map")
    return {f: getattr(info, f) for f, _ in _MapInfo._fields_}


def link_info(fd: int) -> dict[str, int]:
    """Link id, its program's id, and the id of what it is attached to (cgroup id or map id)."""
    info = _LinkInfo()
    _info(fd, info, "link")
    target = info.target.cgroup_id if info.type == BPF_LINK_TYPE_CGROUP else info.target.map_id
    return {"type": info.type, "id": info.id, "prog_id": info.prog_id, "target_id": target}


# -- attachments --------------------------------------------------------------------------------------


def prog_query(target_fd: int, attach_type: int) -> tuple[list[int], int]:
    """Ids of the programs attached directly to a cgroup or map for one hook, and the hook's
    attach flags (0 exclusive, BPF_F_ALLOW_OVERRIDE, BPF_F_ALLOW_MULTI; 0 also when empty)."""
    ids = (ctypes.c_uint32 * _MAX_PROGS)()
    count = ctypes.c_uint32(len(ids))
    flags = ctypes.c_uint32(0)
    _check(
        lib().bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)),
        f"querying attach type {attach_type} on fd {target_fd}",
        "",
    )
    return [ids[i] for i in range(min(count.value, len(ids)))], flags.value


def prog_attach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    """BPF_PROG_ATTACH without flags: replaces the hook's program atomically (a map's sk_msg)."""
    _check(
        lib().bpf_prog_attach(prog_fd, target_fd, attach_type, 0),
        f"attaching program fd {prog_fd} (attach type {attach_type})",
        "",
        attach=True,
    )


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    """Detach a program attached with BPF_PROG_ATTACH (not one held by a link)."""
    _check(
        lib().bpf_prog_detach2(prog_fd, target_fd, attach_type),
        f"detaching program fd {prog_fd} (attach type {attach_type})",
        "",
    )


def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str, busy_fix: str) -> int:
    """A new link (multi-attach on a cgroup); the link fd. ``what`` names the hook and
    ``busy_fix`` says what to do when another program holds it, for the error message."""
    ret = lib().bpf_link_create(prog_fd, target_fd, attach_type, None)
    if ret < 0:
        if -ret in (errno.EINVAL, errno.EOPNOTSUPP):
            busy_fix = "this kernel has no BPF links for this hook (cgroup links: 5.7, sockmap links: 6.10)"
        _raise(ret, f"attaching through a BPF link to {what}", busy_fix, attach=True)
    return ret


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw tracepoint program; the returned fd holds the attachment (close it to detach)."""
    return _check(
        lib().bpf_raw_tracepoint_open(name.encode(), prog_fd),
        f"attaching to raw tracepoint {name}",
        "this kernel or its security policy refuses raw tracepoints",
    )


def iter_create(link_fd: int) -> int:
    """A new pass of an iterator link: an fd whose read()s run the program over the objects
    (for bpf_iter/tcp: the TCP sockets of the calling thread's network namespace)."""
    return _check(lib().bpf_iter_create(link_fd), f"starting a pass of iterator link fd {link_fd}", "")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program atomically: the hook is never without one, the link stays."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), f"replacing the program of link fd {link_fd}", "")


def map_update(map_fd: int, key: ctypes._CData, value: ctypes._CData) -> None:
    _check(
        lib().bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0),  # type: ignore[arg-type]
        "writing a map entry",
        "the map must be the pinned one of this sockops version",
    )


def link_detach(link_fd: int) -> None:
    """Detach a link's program now, even while other fds or a pin still hold the link."""
    _check(lib().bpf_link_detach(link_fd), f"detaching link fd {link_fd}", "")


__all__ = [
    "BPF_CGROUP_INET_EGRESS",
    "BPF_CGROUP_SOCK_OPS",
    "BPF_F_ALLOW_MULTI",
    "BPF_F_ALLOW_OVERRIDE",
    "BPF_SK_MSG_VERDICT",
    "BpfCallFailed",
    "HookBusy",
    "LinkDefunct",
    "NotFound",
    "NotPermitted",
    "NotSupported",
    "link_create",
    "link_detach",
    "link_fd_by_id",
    "link_info",
    "link_update",
    "map_info",
    "obj_get",
    "obj_pin",
    "prog_attach",
    "prog_detach",
    "prog_fd_by_id",
    "prog_info",
    "prog_query",
]
