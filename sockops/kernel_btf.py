"""Offsets of the kernel-internal fields the BPF programs read, taken from the running kernel's BTF.

bcc compiles against whatever kernel headers the distribution ships (Debian's 6.1 headers on a
6.18 kernel here), which is harmless for the UAPI context structs (`struct bpf_sock_ops`) but
wrong for internal ones such as `struct sock` or `struct tcp_sock`, whose layout changes with
every kernel and config. So the programs never name an internal struct: they walk BTF-typed
pointers (`bpf_skc_to_tcp_sock()`) at byte offsets this module reads from
`/sys/kernel/btf/vmlinux` through libbpf, and the verifier checks each load against the same BTF
(a wrong offset is refused at load, never read silently). docs/DATAPLANE.md, "Who may be
redirected to", says which fields and why.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

from sockops.errors import SockopsError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5

# (macro, struct, member path) for each field a program reads; the macro is what the C uses.
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("KOFF_SK_SOCKET", "sock", "sk_socket"),
    ("KOFF_SK_UID", "sock", "sk_uid"),  # kuid_t: its one member is the uid
    ("KOFF_SOCKET_FILE", "socket", "file"),
    ("KOFF_FILE_F_FLAGS", "file", "f_flags"),
    ("KOFF_TP_COPIED_SEQ", "tcp_sock", "copied_seq"),
    ("KOFF_TP_RCV_NXT", "tcp_sock", "rcv_nxt"),
    ("KOFF_TP_WRITE_SEQ", "tcp_sock", "write_seq"),
    ("KOFF_TP_SND_UNA", "tcp_sock", "snd_una"),
    ("KOFF_TP_BYTES_ACKED", "tcp_sock", "bytes_acked"),
    # late insertion (bpf/late.bpf.c): an iterator has no context fields, only the socket
    ("KOFF_SKC_DADDR", "sock_common", "skc_daddr"),
    ("KOFF_SKC_RCV_SADDR", "sock_common", "skc_rcv_saddr"),
    ("KOFF_SKC_DPORT", "sock_common", "skc_dport"),
    ("KOFF_SKC_NUM", "sock_common", "skc_num"),
    ("KOFF_SKC_FAMILY", "sock_common", "skc_family"),
    ("KOFF_SKC_STATE", "sock_common", "skc_state"),
    ("KOFF_SKC_NET", "sock_common", "skc_net"),  # possible_net_t: its one member is the pointer
    ("KOFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr"),
    ("KOFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr"),
    ("KOFF_NET_COOKIE", "net", "net_cookie"),
    ("KOFF_ICSK_ULP_DATA", "inet_connection_sock", "icsk_ulp_data"),  # tcp_sock starts with it
    ("KOFF_SK_USER_DATA", "sock", "sk_user_data"),
    ("KOFF_SK_MSG_SK_REDIR", "sk_msg", "sk_redir"),
    ("KOFF_PSOCK_MSG_TOT_LEN", "sk_psock", "msg_tot_len"),
)


# Fields of the reader hook (bpf/reader.bpf.c) only: from the calling task to the socket behind a
# file descriptor, the process's identity, and the syscall's first two arguments. A kernel without
# one of them (pt_regs.di is x86-64's) loads everything but the hook, and then splice readers are
# not known (docs/DATAPLANE.md, "Splice readers").
OPTIONAL_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("KOFF_TASK_FILES", "task_struct", "files"),
    ("KOFF_FILES_FDT", "files_struct", "fdt"),
    ("KOFF_FDT_FD", "fdtable", "fd"),
    ("KOFF_FDT_MAX_FDS", "fdtable", "max_fds"),
    ("KOFF_FILE_PRIVATE_DATA", "file", "private_data"),
    ("KOFF_FILE_F_INODE", "file", "f_inode"),
    ("KOFF_INODE_I_MODE", "inode", "i_mode"),
    ("KOFF_SOCKET_SK", "socket", "sk"),
    ("KOFF_PT_REGS_ARG0", "pt_regs", "di"),
    ("KOFF_PT_REGS_ARG1", "pt_regs", "si"),
    ("KOFF_SK_TYPE", "sock", "sk_type"),
    ("KOFF_TASK_GROUP_LEADER", "task_struct", "group_leader"),
    ("KOFF_TASK_START_TIME", "task_struct", "start_time"),
    ("KOFF_TASK_REAL_PARENT", "task_struct", "real_parent"),
    ("KOFF_TASK_TGID", "task_struct", "tgid"),
)


class KernelBtfMissing(SockopsError):
    """The running kernel exposes no BTF, or lacks a field sockops needs."""


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.btf__parse.restype = ctypes.c_void_p
    lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.btf__free.argtypes = [ctypes.c_void_p]
    lib.btf__find_by_name_kind.restype = ctypes.c_int32
    lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.btf__type_by_id.restype = ctypes.POINTER(_BtfType)
    lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__name_by_offset.restype = ctypes.c_char_p
    lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.btf__resolve_type.restype = ctypes.c_int32
    lib.btf__resolve_type.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    return lib


def _member_offset(lib: ctypes.CDLL, btf: int, type_id: int, name: str) -> int | None:
    """Byte offset of `name` in the struct or union `type_id`, looking into anonymous members
    (the kernel groups fields in unnamed structs and unions, e.g. tcp_sock's cache-line groups)."""
    t = lib.btf__type_by_id(btf, type_id).contents
    kind = (t.info >> 24) & 0x1F
    if kind not in (BTF_KIND_STRUCT, BTF_KIND_UNION):
        return None
    vlen = t.info & 0xFFFF
    bitfields = bool(t.info >> 31)
    members = ctypes.cast(
        ctypes.addressof(t) + ctypes.sizeof(_BtfType), ctypes.POINTER(_BtfMember * vlen)
    ).contents
    for m in members:
        bits = m.offset & 0xFFFFFF if bitfields else m.offset
        member_name = lib.btf__name_by_offset(btf, m.name_off).decode()
        if member_name == name:
            return bits // 8
        if not member_name:
            inner = _member_offset(lib, btf, lib.btf__resolve_type(btf, m.type), name)
            if inner is not None:
                return bits // 8 + inner
    return None


def _find(lib: ctypes.CDLL, btf: int, struct: str, member: str) -> int | None:
    type_id = lib.btf__find_by_name_kind(btf, struct.encode(), BTF_KIND_STRUCT)
    return _member_offset(lib, btf, type_id, member) if type_id > 0 else None


@dataclass(frozen=True)
class KernelOffsets:
    """Byte offsets of the fields in FIELDS, as the running kernel lays them out."""

    offsets: dict[str, int]

    def cflags(self) -> list[str]:
        return [f"-D{macro}={off}" for macro, off in sorted(self.offsets.items())]


@functools.cache
def kernel_offsets(path: Path = VMLINUX_BTF) -> KernelOffsets:
    """Read every offset in FIELDS from the kernel's BTF. Raises KernelBtfMissing with the fix."""
    if not path.exists():
        raise KernelBtfMissing(
            f"{path} is missing: sockops needs a kernel built with CONFIG_DEBUG_INFO_BTF=y "
            "(every major distribution kernel since 5.x has it)"
        )
    lib = _lib()
    btf = lib.btf__parse(str(path).encode(), None)
    if not btf:
        raise KernelBtfMissing(f"libbpf could not parse {path} (errno {ctypes.get_errno()})")
    try:
        found: dict[str, int] = {}
        for macro, struct, member in FIELDS:
            off = _find(lib, btf, struct, member)
            if off is None:
                raise KernelBtfMissing(
                    f"the running kernel's BTF has no struct {struct} member {member}: this "
                    "kernel is not supported by this sockops version (report the kernel version)"
                )
            found[macro] = off
        optional = {macro: _find(lib, btf, struct, member) for macro, struct, member in OPTIONAL_FIELDS}
        if None not in optional.values():
            found.update(optional)  # type: ignore[arg-type]
        return KernelOffsets(found)
    finally:
        lib.btf__free(btf)
