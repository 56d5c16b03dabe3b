"""The pinned maps: their sizes, re-opening them by path, and reading and writing them.

Everything user space does with the maps the programs share (bpf/maps.bpf.h; layouts in
sockops/layout.py) goes through here: the agent's reconciler writes netns_conf and node_pods,
the metrics collector and `sockops status` read counters, stats and entries, and a load adopts
the sizes of maps already pinned (a pinned map cannot be resized while sockets sit in it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sockops import layout, libbpf
from sockops.errors import IncompatiblePins, NotLoaded, PermissionMissing, SockopsError

DEFAULT_BPFFS_DIR = Path("/sys/fs/bpf/sockops")

UNINSTALL_MARK = 0  # netns_conf key that says "uninstall in progress" (no namespace has cookie 0)


@dataclass(frozen=True)
class MapSizes:
    """Capacity of each map. A full map means "not accelerated", never a failed connection."""

    sockhash: int = 65536
    pending: int = 16384
    netns: int = 1024


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
    layout.MAP_ANOMALIES: (8, ctypes.sizeof(layout.NetnsAnomalies)),
    layout.MAP_PROCS: (ctypes.sizeof(layout.ProcKey), ctypes.sizeof(layout.ProcReader)),
    layout.MAP_PORT_OWNER: (ctypes.sizeof(layout.PortKey), ctypes.sizeof(layout.PortInfo)),
    layout.MAP_SOCK_OWNER: (8, ctypes.sizeof(layout.ProcKey)),
    layout.MAP_READER_STATE: (4, 4),
    layout.MAP_SPLICED_SOCKS: (8, 8),
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


@dataclass(frozen=True)
class Anomalies:
    """One namespace's anomaly counts by kind (layout.ANOMALIES) and, for each kind seen, the
    last sending process that hit it: (pid, comm)."""

    counts: dict[str, int]
    last: dict[str, tuple[int, str]]

    @classmethod
    def from_struct(cls, v: layout.NetnsAnomalies) -> Anomalies:
        counts = {kind: int(v.count[i]) for kind, i in layout.ANOMALIES.items()}
        last = {
            kind: (int(v.pid[i]), v.comm[i].value.decode(errors="replace"))
            for kind, i in layout.ANOMALIES.items()
            if counts[kind]
        }
        return cls(counts, last)


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
        if not self._lookup(layout.MAP_ANOMALIES, key, layout.NetnsAnomalies()):
            self._update(layout.MAP_ANOMALIES, key, layout.NetnsAnomalies())
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

    def watch(self, cookie: int) -> None:
        """Count a namespace's anomalies without enabling it (observe mode): the reader hook
        counts the splices of its programs (bpf/reader.bpf.c). Idempotent."""
        key = ctypes.c_uint64(cookie)
        if not self._lookup(layout.MAP_ANOMALIES, key, layout.NetnsAnomalies()):
            self._update(layout.MAP_ANOMALIES, key, layout.NetnsAnomalies())

    def unwatch(self, cookie: int) -> None:
        """Stop counting a namespace that is neither enabled nor observed any more."""
        key = ctypes.c_uint64(cookie)
        if not self._lookup(layout.MAP_NETNS_CONF, key, layout.NetnsConf()):
            self._delete(layout.MAP_ANOMALIES, key)

    def forget(self, cookie: int) -> None:
        """Drop a namespace's counters (the namespace is gone)."""
        self._delete(layout.MAP_NETNS_STATS, ctypes.c_uint64(cookie))
        self._delete(layout.MAP_ANOMALIES, ctypes.c_uint64(cookie))

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

    def anomalies(self) -> dict[int, Anomalies]:
        """What went wrong in each enabled namespace's traffic (struct netns_anomalies)."""
        out = {}
        for key in self._keys(layout.MAP_ANOMALIES, ctypes.c_uint64):
            value = layout.NetnsAnomalies()
            if self._lookup(layout.MAP_ANOMALIES, key, value):
                out[key.value] = Anomalies.from_struct(value)
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
