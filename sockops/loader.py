"""Compile and load with bcc, pin and re-open the maps, and attach: the data plane's lifecycle.

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
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sockops import layout, libbpf, links
from sockops.errors import (
    BpffsMissing,
    CgroupMissing,
    HeadersMissing,
    IncompatiblePins,
    NotLoaded,
    PermissionMissing,
    SockopsError,
)

DEFAULT_BPFFS_DIR = Path("/sys/fs/bpf/sockops")

UNINSTALL_MARK = 0  # netns_conf key that says "uninstall in progress" (no namespace has cookie 0)

PROG_SOCK_OPS = "sockops_main"
PROG_SK_MSG = "sockops_redirect"


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
    # sockops.bpf.c before redirect.bpf.c: it defines decide_client(), which both use.
    for name in ("maps.bpf.h", "sockops.bpf.c", "redirect.bpf.c", "synack.bpf.c"):
        try:
            parts.append(f"/* ---- {name} ---- */\n" + (d / name).read_text())
        except FileNotFoundError as e:
            raise SockopsError(
                f"BPF source {d / name} not found: set SOCKOPS_BPF_DIR to the bpf/ directory"
            ) from e
    return "\n".join(parts)


@dataclass(frozen=True)
class MapSizes:
    """Capacity of each map. A full map means "not accelerated", never a failed connection."""

    sockhash: int = 65536
    pending: int = 16384
    netns: int = 1024


def cflags(bpffs_dir: Path, sizes: MapSizes, src_dir: Path | None = None) -> list[str]:
    return [
        f"-I{src_dir or bpf_source_dir()}",
        f'-DSOCKOPS_PIN_DIR="{bpffs_dir}"',
        f"-DSOCKOPS_SOCKHASH_MAX={sizes.sockhash}",
        f"-DSOCKOPS_PENDING_MAX={sizes.pending}",
        f"-DSOCKOPS_NETNS_MAX={sizes.netns}",
    ]


def _open_pin(path: Path) -> int:
    """An fd for a pinned object; a missing permission says how to get it."""
    try:
        return libbpf.obj_get(path)
    except libbpf.NotPermitted as e:
        raise PermissionMissing(f"cannot open the pin {path}: run as root (CAP_BPF, CAP_SYS_ADMIN)") from e


def pinned_map_info(bpffs_dir: Path) -> dict[str, dict[str, int]]:
    """map_info() of every sockops map pinned under the directory (empty when nothing is)."""
    out = {}
    for name in layout.ALL_MAPS:
        path = bpffs_dir / name
        if not path.exists():
            continue
        fd = _open_pin(path)
        try:
            out[name] = libbpf.map_info(fd)
        finally:
            os.close(fd)
    return out


# Key and value sizes of the maps whose layout user space and both programs must agree on.
_LAYOUTS = {
    layout.MAP_SOCKHASH: (ctypes.sizeof(layout.SockKey), None),
    layout.MAP_PENDING: (ctypes.sizeof(layout.SockKey), ctypes.sizeof(layout.Pending)),
    layout.MAP_SYNACKS: (ctypes.sizeof(layout.SynackKey), ctypes.sizeof(layout.Synack)),
    layout.MAP_NETNS_CONF: (8, ctypes.sizeof(layout.NetnsConf)),
    layout.MAP_NETNS_STATS: (8, ctypes.sizeof(layout.NetnsStats)),
    layout.MAP_SOCK_STATE: (4, ctypes.sizeof(layout.SockState)),
}


def adopt_sizes(bpffs_dir: Path, wanted: MapSizes) -> tuple[MapSizes, list[str]]:
    """The sizes a load must use so it re-opens the pinned maps, and what differs from ``wanted``.

    A pinned map cannot be resized while sockets sit in it, and bcc silently re-opens a pin of
    another size, so the agent adopts the pinned capacity and says so; resizing takes an
    uninstall (which drains) and a fresh start. Pins of another key or value layout (a
    downgrade, or an upgrade that changed sockops.h) cannot be shared at all: raise with the fix.
    """
    info = pinned_map_info(bpffs_dir)
    for name, (key_size, value_size) in _LAYOUTS.items():
        if name not in info:
            continue
        got = info[name]
        if got["key_size"] != key_size or (value_size is not None and got["value_size"] != value_size):
            raise IncompatiblePins(
                f"the map pinned at {bpffs_dir / name} has another layout (key {got['key_size']} B, "
                f"value {got['value_size']} B; this version needs {key_size} B / {value_size} B): "
                f"it was made by another sockops version. Run that version's `sockops uninstall` "
                f"(drains live connections), or start this one with another --bpffs directory"
            )
    notes = []
    effective = {}
    for field_name, map_name in (
        ("sockhash", layout.MAP_SOCKHASH),
        ("pending", layout.MAP_PENDING),
        ("netns", layout.MAP_NETNS_CONF),
    ):
        want = getattr(wanted, field_name)
        have = info.get(map_name, {}).get("max_entries", want)
        effective[field_name] = have
        if have != want:
            notes.append(
                f"{map_name} is pinned with {have} entries, not the configured {want}: keeping {have} "
                f"(maps in use cannot be resized; `sockops uninstall` then restart to resize)"
            )
    return MapSizes(**effective), notes


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


class PinnedMaps:
    """The maps under a bpffs directory, opened by path: what the CLI uses while an agent runs."""

    def __init__(self, bpffs_dir: Path = DEFAULT_BPFFS_DIR) -> None:
        from bcc import libbcc  # imported here so modules that only parse settings need no bcc

        self._lib = libbcc.lib
        self.dir = bpffs_dir
        self.fds: dict[str, int] = {}
        missing = [name for name in layout.ALL_MAPS if not (bpffs_dir / name).exists()]
        if missing:
            raise NotLoaded(
                f"no sockops maps pinned under {bpffs_dir} (missing {', '.join(missing)}): "
                f"start the agent first (sockops agent), or pass the agent's --bpffs"
            )
        for name in layout.ALL_MAPS:
            try:
                self.fds[name] = _open_pin(bpffs_dir / name)
            except SockopsError:
                self.close()
                raise
        self.ncpus = _possible_cpus()

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generic map access -------------------------------------------------------------------
    def _lookup(self, name: str, key: ctypes.Structure | ctypes._SimpleCData, value: object) -> bool:
        return self._lib.bpf_lookup_elem(self.fds[name], ctypes.byref(key), ctypes.byref(value)) == 0

    def _update(self, name: str, key: object, value: object, flags: int = 0) -> None:
        if self._lib.bpf_update_elem(self.fds[name], ctypes.byref(key), ctypes.byref(value), flags) < 0:
            err = ctypes.get_errno()
            raise SockopsError(f"writing map {name} failed: {os.strerror(err) if err else 'error'}")

    def _delete(self, name: str, key: object) -> bool:
        return self._lib.bpf_delete_elem(self.fds[name], ctypes.byref(key)) == 0

    def _keys(self, name: str, key_type: type) -> Iterator:
        key = key_type()
        nxt = key_type()
        first = True
        while True:
            ret = self._lib.bpf_get_next_key(
                self.fds[name], None if first else ctypes.byref(key), ctypes.byref(nxt)
            )
            if ret < 0:
                return
            first = False
            yield key_type.from_buffer_copy(nxt)
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key_type))

    def _percpu(self, name: str, key: object, value_type: type) -> list | None:
        stride = (ctypes.sizeof(value_type) + 7) // 8 * 8
        buf = (ctypes.c_uint8 * (stride * self.ncpus))()
        if self._lib.bpf_lookup_elem(self.fds[name], ctypes.byref(key), buf) != 0:
            return None
        return [value_type.from_buffer_copy(buf, i * stride) for i in range(self.ncpus)]

    # -- namespaces -----------------------------------------------------------------------------
    def enable(self, cookie: int, settings: layout.NetnsSettings, sync: bool = True) -> None:
        """Opt a namespace in: new connections in it are accelerated. Idempotent.

        ``sync=False`` leaves node_pods to the caller (the reconciler syncs once per pass)."""
        key = ctypes.c_uint64(cookie)
        if self._percpu(layout.MAP_NETNS_STATS, key, layout.NetnsStats) is None:
            zero = (ctypes.c_uint8 * (((ctypes.sizeof(layout.NetnsStats) + 7) // 8 * 8) * self.ncpus))()
            self._update(layout.MAP_NETNS_STATS, key, zero)
        self._update(layout.MAP_NETNS_CONF, key, settings.to_struct())
        if sync:
            self.sync_node_pods()

    def disable(self, cookie: int, sync: bool = True) -> bool:
        """Opt a namespace out: only new connections are affected; live ones keep their peers.

        The stats entry stays so counters of connections still running keep adding up.
        """
        gone = self._delete(layout.MAP_NETNS_CONF, ctypes.c_uint64(cookie))
        if sync:
            self.sync_node_pods()
        return gone

    def forget(self, cookie: int) -> None:
        """Drop a namespace's counters (the namespace is gone)."""
        self._delete(layout.MAP_NETNS_STATS, ctypes.c_uint64(cookie))

    def mark_uninstalling(self) -> None:
        """Tell running agents to stop writing: `sockops uninstall` is draining these maps.

        The mark is the entry of netns cookie 0, which no namespace has, so the programs never
        see it; agents poll for it and go idle, and a new agent refuses to enforce while it is
        there (the maps are about to go).
        """
        self._update(layout.MAP_NETNS_CONF, ctypes.c_uint64(UNINSTALL_MARK), layout.NetnsConf())

    def clear_uninstall_mark(self) -> bool:
        return self._delete(layout.MAP_NETNS_CONF, ctypes.c_uint64(UNINSTALL_MARK))

    def uninstalling(self) -> bool:
        return self._lookup(layout.MAP_NETNS_CONF, ctypes.c_uint64(UNINSTALL_MARK), layout.NetnsConf())

    def enabled(self) -> dict[int, layout.NetnsSettings]:
        out = {}
        for key in self._keys(layout.MAP_NETNS_CONF, ctypes.c_uint64):
            if key.value == UNINSTALL_MARK:
                continue
            conf = layout.NetnsConf()
            if self._lookup(layout.MAP_NETNS_CONF, key, conf):
                out[key.value] = layout.NetnsSettings.from_struct(conf)
        return out

    # -- pods of this node (cross-pod pairing) ---------------------------------------------------
    def node_pods(self) -> dict[str, int]:
        """Pod IP -> owning netns cookie (0 = claimed by two namespaces), as the map holds it."""
        out = {}
        for key in self._keys(layout.MAP_NODE_PODS, layout.PodIp):
            owner = ctypes.c_uint64()
            if self._lookup(layout.MAP_NODE_PODS, key, owner):
                out[layout.words_to_ip(key.ip)] = owner.value
        return out

    def sync_node_pods(
        self,
        current: dict[str, int] | None = None,
        enabled: dict[int, layout.NetnsSettings] | None = None,
    ) -> dict[str, int]:
        """Make node_pods match the enabled namespaces' addresses; returns what it now holds.

        Derived from netns_conf, so every writer (agent, `sockops enable`, tests, the bench)
        gets cross-pod pairing the same way. ``current`` and ``enabled`` (what the caller knows
        the two maps hold) skip reading them back.
        """
        want = node_pods_for(self.enabled() if enabled is None else enabled)
        have = self.node_pods() if current is None else current
        for ip, owner in want.items():
            if have.get(ip) != owner:
                key = layout.PodIp(layout.ip_to_words(ip))
                self._update(layout.MAP_NODE_PODS, key, ctypes.c_uint64(owner))
        for ip in set(have) - set(want):
            self._delete(layout.MAP_NODE_PODS, layout.PodIp(layout.ip_to_words(ip)))
        return want

    def netns_stats(self) -> dict[int, dict[str, int]]:
        out = {}
        for key in self._keys(layout.MAP_NETNS_STATS, ctypes.c_uint64):
            per_cpu = self._percpu(layout.MAP_NETNS_STATS, key, layout.NetnsStats)
            if per_cpu is None:
                continue
            out[key.value] = {f: sum(getattr(v, f) for v in per_cpu) for f, _ in layout.NetnsStats._fields_}
        return out

    # -- counters -------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        totals = {}
        for name, idx in layout.COUNTERS.items():
            per_cpu = self._percpu(layout.MAP_COUNTERS, ctypes.c_uint32(idx), ctypes.c_uint64)
            totals[name] = sum(v.value for v in per_cpu) if per_cpu else 0
        return totals

    def sockets(self) -> list[layout.SockKey]:
        return list(self._keys(layout.MAP_SOCKHASH, layout.SockKey))

    def pending(self) -> list[layout.SockKey]:
        return list(self._keys(layout.MAP_PENDING, layout.SockKey))

    def synacks(self) -> list[layout.SynackKey]:
        """SYN-ACK records not (yet) taken by their accepted socket."""
        return list(self._keys(layout.MAP_SYNACKS, layout.SynackKey))


def node_pods_for(enabled: dict[int, layout.NetnsSettings]) -> dict[str, int]:
    """The node_pods content for these enabled namespaces: an IP two of them claim maps to 0.

    Two namespaces with one address happen in tests (and on hosts running several isolated
    networks); pairing across them would be a guess, so neither gets cross-pod pairing for it.
    """
    out: dict[str, int] = {}
    for cookie, settings in sorted(enabled.items()):
        for ip in settings.local_ips:
            out[ip] = cookie if out.get(ip, cookie) == cookie else 0
    return out


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


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
        cls, bpffs_dir: Path = DEFAULT_BPFFS_DIR, sizes: MapSizes | None = None, debug_text: bool = False
    ) -> DataPlane:
        """Compile and load; create or re-open the pinned maps."""
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
            b = BPF(text=text, cflags=cflags(bpffs_dir, sizes))
            for att in links.ATTACHMENTS:
                programs[att.program] = b.load_func(att.program, getattr(BPF, att.prog_type))
        except Exception as e:  # bcc raises bare Exception with the verifier log on stderr
            raise SockopsError(f"loading the BPF programs failed: {e}") from e
        return cls(bpffs_dir=bpffs_dir, sizes=sizes, bpf=b, programs=programs, notes=notes)

    def attach(self, cgroup: Path) -> dict[str, str]:
        """Attach every loaded program through its pinned link; what was done, by hook kind.

        A link pinned by an earlier agent gets the new program with BPF_LINK_UPDATE (atomic,
        same link); a missing one is created and pinned, replacing an older sockops's
        BPF_PROG_ATTACH attachment (links.attach). Programs of other tools on the cgroup stay.
        """
        check_cgroup_v2(cgroup)
        done = {}
        for att in links.ATTACHMENTS:
            prog = self.programs.get(att.program)
            if prog is not None:
                done[att.kind] = links.attach(att, prog.fd, cgroup, self.bpffs_dir)  # type: ignore[attr-defined]
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
    links.detach(cgroup, bpffs_dir)


def unpin(bpffs_dir: Path) -> None:
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


__all__ = [
    "DEFAULT_BPFFS_DIR",
    "DataPlane",
    "MapSizes",
    "PinnedMaps",
    "adopt_sizes",
    "attached_programs",
    "detach_all",
    "programs_attached",
    "unpin",
]
