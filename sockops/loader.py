"""Compile and load with bcc, and attach: the data plane's lifecycle (the maps: sockops/maps.py).

Maps are pinned under a bpffs directory (default /sys/fs/bpf/sockops) by the programs' own map
definitions, so a second load re-opens the same maps instead of creating new ones: that is what
lets an agent restart or upgrade without breaking live connections. Programs are attached through
BPF links pinned beside the maps (sockops/links.py): multi-attach on the cgroup, so other tools'
programs keep running; a new agent swaps the program on the pinned link atomically (no window
without a program, never two of ours), and an attachment outlives the process that made it.
bpf(2) itself is reached only through libbpf (sockops/libbpf.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from sockops import layout, links, reader_hook
from sockops.errors import (
    BpffsMissing,
    CgroupMissing,
    HeadersMissing,
    PermissionMissing,
    SockopsError,
)
from sockops.kernel_btf import kernel_offsets
from sockops.maps import DEFAULT_BPFFS_DIR, MapSizes, PinnedMaps, adopt_sizes

PROG_SOCK_OPS = "sockops_main"
PROG_SK_MSG = "sockops_redirect"
PROG_LATE = "bpf_iter__tcp"  # bpf/late.bpf.c; not attached to a hook, run by sockops/late.py
PROG_READER = "sockops_reader"  # bpf/reader.bpf.c; a raw tracepoint (sockops/reader_hook.py)
# splice(2)'s number, for the reader hook; other architectures load without one (splice readers
# are then not known, as before the hook).
NR_SPLICE = {"x86_64": 275}


def bpf_source_dir() -> Path:
    """Where the C sources live: $SOCKOPS_BPF_DIR, else bpf/ beside the package (the repo)."""
    env = os.environ.get("SOCKOPS_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "bpf"


def program_text(src_dir: Path | None = None) -> str:
    """The one translation unit bcc compiles.

    bcc rewrites map method calls (``pending.lookup(...)``) only in its main file, not in
    #included ones, so the map header and both programs are joined into one text; their own
    #include lines then hit the header's include guard.
    """
    d = src_dir or bpf_source_dir()
    parts = ["#include <uapi/linux/bpf.h>\n"]
    # sockops.bpf.c first: it defines decide_client() and the address helpers the others use.
    names = ("maps.bpf.h", "sockops.bpf.c", "late.bpf.c", "redirect.bpf.c", "synack.bpf.c", "reader.bpf.c")
    for name in names:
        try:
            parts.append(f"/* ---- {name} ---- */\n" + (d / name).read_text())
        except FileNotFoundError as e:
            raise SockopsError(
                f"BPF source {d / name} not found: set SOCKOPS_BPF_DIR to the bpf/ directory"
            ) from e
    return "\n".join(parts)


def cflags(
    bpffs_dir: Path,
    sizes: MapSizes,
    src_dir: Path | None = None,
    queue_budget: int = layout.DEFAULT_QUEUE_BUDGET,
    proxy_uid: int = layout.DEFAULT_PROXY_UID,
) -> list[str]:
    return [
        f"-I{src_dir or bpf_source_dir()}",
        f'-DSOCKOPS_PIN_DIR="{bpffs_dir}"',
        f"-DSOCKOPS_SOCKHASH_MAX={sizes.sockhash}",
        f"-DSOCKOPS_PENDING_MAX={sizes.pending}",
        f"-DSOCKOPS_NETNS_MAX={sizes.netns}",
        *([f"-DSOCKOPS_NR_SPLICE={NR_SPLICE[arch]}"] if (arch := os.uname().machine) in NR_SPLICE else []),
        f"-DSOCKOPS_QUEUE_BUDGET={queue_budget}",
        f"-DSOCKOPS_PROXY_UID={proxy_uid}",
        *kernel_offsets().cflags(),
    ]


def check_cgroup_v2(cgroup: Path) -> None:
    if not (cgroup / "cgroup.procs").exists() or not (cgroup / "cgroup.controllers").exists():
        raise CgroupMissing(
            f"{cgroup} is not a cgroup v2 directory: mount cgroup2 (mount -t cgroup2 none "
            f"/sys/fs/cgroup/unified) and pass its path with --cgroup"
        )


def check_bpffs(bpffs_dir: Path) -> None:
    parent = bpffs_dir if bpffs_dir.exists() else bpffs_dir.parent
    if not parent.exists():
        raise BpffsMissing(f"{parent} does not exist: mount -t bpf bpf /sys/fs/bpf")
    # The longest mount point that holds the directory decides its filesystem type.
    best = ""
    kind = ""
    target = str(parent.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        holds = target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")
        if holds and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    if kind != "bpf":
        raise BpffsMissing(
            f"{parent} is not on a bpf filesystem (found {kind or 'none'}): "
            f"mount -t bpf bpf /sys/fs/bpf, or pass --bpffs DIR inside a bpffs mount"
        )


@dataclass
class DataPlane:
    """Compiled and loaded programs (by C function name) plus their pinned maps."""

    bpffs_dir: Path
    sizes: MapSizes
    bpf: object = field(repr=False)
    programs: dict[str, object] = field(repr=False)  # links.Attachment.program -> bcc function
    notes: list[str] = field(default_factory=list)  # what the load adapted to (pinned sizes)

    @property
    def sock_ops(self) -> object:
        return self.programs[PROG_SOCK_OPS]

    @property
    def sk_msg(self) -> object:
        return self.programs[PROG_SK_MSG]

    @classmethod
    def load(
        cls,
        bpffs_dir: Path = DEFAULT_BPFFS_DIR,
        sizes: MapSizes | None = None,
        debug_text: bool = False,
        queue_budget: int = layout.DEFAULT_QUEUE_BUDGET,
        proxy_uid: int = layout.DEFAULT_PROXY_UID,
    ) -> DataPlane:
        """Compile and load; create or re-open the pinned maps. ``queue_budget``: bytes a
        receiver may hold unread before its peer sends over TCP; ``proxy_uid``: the mesh proxy's
        UID, whose sockets need no proof of how they are read (docs/DATAPLANE.md)."""
        sizes = sizes or MapSizes()
        check_bpffs(bpffs_dir)
        if os.geteuid() != 0:
            raise PermissionMissing("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        check_headers()
        try:
            from bcc import BPF
        except ImportError as e:
            raise SockopsError(
                "bcc's Python module is missing: apt-get install python3-bpfcc, and make the venv "
                "with --system-site-packages"
            ) from e
        notes: list[str] = []
        if bpffs_dir.exists():
            sizes, notes = adopt_sizes(bpffs_dir, sizes)
        bpffs_dir.mkdir(parents=True, exist_ok=True)
        text = program_text()
        if debug_text:
            print(text)
        programs: dict[str, object] = {}
        try:
            b = BPF(
                text=text,
                cflags=cflags(bpffs_dir, sizes, queue_budget=queue_budget, proxy_uid=proxy_uid),
            )
            for att in links.ATTACHMENTS:
                programs[att.program] = b.load_func(att.program, getattr(BPF, att.prog_type))
        except Exception as e:  # bcc raises bare Exception with the verifier log on stderr
            raise SockopsError(f"loading the BPF programs failed: {e}") from e
        try:
            programs[PROG_LATE] = b.load_func(PROG_LATE, BPF.TRACING)
        except Exception as e:  # an older kernel: connections are accelerated from their handshake only
            notes.append(f"late insertion unavailable (the tcp iterator did not load: {e})")
        try:
            programs[PROG_READER] = b.load_func(PROG_READER, BPF.RAW_TRACEPOINT)
        except Exception as e:  # another architecture, or no raw tracepoints: no reader hook
            notes.append(
                f"reader hook unavailable (its raw tracepoint program did not load: {e}): splice "
                f"readers are not known"
            )
        return cls(bpffs_dir=bpffs_dir, sizes=sizes, bpf=b, programs=programs, notes=notes)

    def attach(self, cgroup: Path, reader: bool = True) -> dict[str, str]:
        """Attach every loaded program through its pinned link; what was done, by hook kind.

        A link pinned by an earlier agent gets the new program with BPF_LINK_UPDATE (atomic,
        same link); a missing one is created and pinned, replacing an older sockops's
        BPF_PROG_ATTACH attachment (links.attach). Programs of other tools on the cgroup stay.
        ``reader``: attach the reader hook (sockops/reader_hook.py), or remove it.
        """
        check_cgroup_v2(cgroup)
        done = {}
        for att in links.ATTACHMENTS:
            prog = self.programs.get(att.program)
            if prog is not None:
                done[att.kind] = links.attach(att, prog.fd, cgroup, self.bpffs_dir)  # type: ignore[attr-defined]
        prog = self.programs.get(PROG_READER)
        if not reader:
            reader_hook.detach(self.bpffs_dir)  # switched off: an earlier agent's hook goes too
            done["reader_hook"] = "off"
        elif prog is not None:
            try:
                done["reader_hook"] = reader_hook.attach(prog.fd, self.bpffs_dir)  # type: ignore[attr-defined]
            except SockopsError as e:  # refused here: only the sidecar's sockets are redirected to
                self.notes.append(f"reader hook not attached ({e}): splice readers are not known")
        return done

    def bpf_map_fd(self, name: str) -> int:
        from bcc import libbcc

        fd = libbcc.lib.bpf_table_fd(self.bpf.module, name.encode())
        if fd < 0:
            raise SockopsError(f"map {name} not found in the loaded module")
        return fd

    def maps(self) -> PinnedMaps:
        return PinnedMaps(self.bpffs_dir)


def attached_programs(cgroup: Path, bpffs_dir: Path) -> dict[str, list[dict[str, object]]]:
    """What is attached now on each of sockops' hooks (by kind), ours and others', with owner."""
    return {h.kind: h.programs for h in links.hooks(cgroup, bpffs_dir)}


def programs_attached(cgroup: Path, bpffs_dir: Path) -> dict[str, bool]:
    """Whether sockops' own programs (by name) are attached: the health a user alerts on."""
    try:
        found = attached_programs(cgroup, bpffs_dir)
    except OSError:
        return {a.kind: False for a in links.ATTACHMENTS}
    return {a.kind: any(p["name"] == a.kernel_name for p in found[a.kind]) for a in links.ATTACHMENTS}


def detach_all(cgroup: Path, bpffs_dir: Path) -> None:
    """Detach sockops' programs (its links, and old-style attachments by name). Idempotent."""
    reader_hook.detach(bpffs_dir)
    links.detach(cgroup, bpffs_dir)


def unpin(bpffs_dir: Path) -> None:
    reader_hook.detach(bpffs_dir)
    links.unpin(bpffs_dir)
    for name in layout.ALL_MAPS:
        with contextlib.suppress(FileNotFoundError):
            (bpffs_dir / name).unlink()
    with contextlib.suppress(OSError):
        bpffs_dir.rmdir()


def check_headers() -> Path:
    """The header tree bcc will compile against; raise with the fix when none is where it looks.

    BCC_KERNEL_SOURCE comes first, as in bcc: the container image sets it to the headers it
    carries (Dockerfile, ``headers`` stage), so a node needs none of its own. bcc takes that
    variable as one whole tree (it force-includes ``include/linux/kconfig.h`` from it), so a
    Debian flavour directory alone, whose other half is the ``-common`` package, does not do.
    """
    env = os.environ.get("BCC_KERNEL_SOURCE")
    release = os.uname().release
    if env is not None:  # bcc takes an empty value as the path "", not as unset
        if env and (Path(env) / "include/linux/kconfig.h").is_file():
            return Path(env)
        raise HeadersMissing(
            f"BCC_KERNEL_SOURCE={env} is not a whole kernel header tree (no include/linux/kconfig.h): "
            "point it at one that has both the generated and the common headers, or unset it"
        )
    for c in (Path(f"/lib/modules/{release}/build"), Path(f"/lib/modules/{release}/source")):
        if (c / "include").is_dir():
            return c
    raise HeadersMissing(
        f"bcc could not find kernel headers for {release}: install linux-headers-amd64 (or "
        f"linux-headers-{release}) and link /lib/modules/{release}/build and /source to "
        f"/usr/src/linux-headers-*-amd64 and -common, or set BCC_KERNEL_SOURCE"
    )


# MapSizes, PinnedMaps and DEFAULT_BPFFS_DIR live in sockops/maps.py; they are part of the data
# plane's interface too, so callers that load and then open the maps may take them from here.
__all__ = [
    "DEFAULT_BPFFS_DIR",
    "DataPlane",
    "MapSizes",
    "PinnedMaps",
    "attached_programs",
    "detach_all",
    "programs_attached",
    "unpin",
]
