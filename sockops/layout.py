"""ctypes mirrors of bpf/sockops.h: the only Python definition of the BPF key and value layouts.

Kept in one module so a layout change is made in two places only (the header and here), and
tests/test_layout.py compares the two by compiling the header's sizeof/offsetof values.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass

ROLE_CLIENT = 0
ROLE_SERVER = 1

PEND_WAITING = 0
PEND_PAIRED = 1
PEND_PASS = 2

DECIDE_UNDECIDED = 0
DECIDE_REDIRECT = 1
DECIDE_PASS = 2
DECIDE_LATE = 3

ORIGIN_HANDSHAKE = 0
ORIGIN_LATE = 1

NETNS_F_SIDECAR = 1
NETNS_F_AGENT = 2
NETNS_LOCAL_IPS = 4

# Map names, which are also their pin file names under the bpffs directory.
MAP_SOCKHASH = "sock_hash"
MAP_PENDING = "pending"
MAP_NETNS_CONF = "netns_conf"
MAP_NETNS_STATS = "netns_stats"
MAP_COUNTERS = "counters"
MAP_SOCK_STATE = "sock_state"
MAP_CONNS = "conns"
MAP_NODE_PODS = "node_pods"
MAP_SYNACKS = "synacks"
MAP_ANOMALIES = "anomalies"
MAP_PROCS = "procs"
MAP_PORT_OWNER = "port_owner"
MAP_SOCK_OWNER = "sock_owner"
MAP_READER_STATE = "reader_state"
MAP_SPLICED_SOCKS = "spliced_socks"
ALL_MAPS = (
    MAP_SOCKHASH,
    MAP_PENDING,
    MAP_NETNS_CONF,
    MAP_NETNS_STATS,
    MAP_COUNTERS,
    MAP_SOCK_STATE,
    MAP_CONNS,
    MAP_NODE_PODS,
    MAP_SYNACKS,
    MAP_ANOMALIES,
    MAP_PROCS,
    MAP_PORT_OWNER,
    MAP_SOCK_OWNER,
    MAP_READER_STATE,
    MAP_SPLICED_SOCKS,
)

# Counter indexes (CNT_* in the header) and the names user space reports them under.
COUNTERS = {
    "sockets_inserted": 0,
    "insert_failures_map_full": 1,
    "insert_failures_busy": 2,
    "insert_failures_other": 3,
    "pending_full": 4,
    "paired_mirror": 5,
    "paired_origdst": 6,
    "connections_passed": 7,
    "pair_race_lost": 8,
    "redirected_messages": 9,
    "redirected_bytes": 10,
    "redirect_misses": 11,
    "sockets_withdrawn": 12,
    "halfclose_left": 13,
    "paired_cross_pod": 14,
    "pending_ambiguous": 15,
    "skipped_mptcp": 16,
    "skipped_fastopen": 17,
    "undecided_fin_left": 18,
    "skipped_blocking": 19,
    "early_tcp_send": 20,
    "late_inserted": 21,
    "late_switched": 22,
    "late_pruned": 23,
    "queue_over_budget": 24,
    "skipped_splicer": 25,
    "skipped_unproven": 26,
}
CNT_MAX = 27

# struct proc_reader and struct port_info flags (the reader hook, bpf/reader.bpf.c)
PROC_F_SPLICED = 1
PROC_F_SERVES = 2
PROC_F_CLIENT_RECV = 4
PORT_F_RECV = 1
PORT_F_SPLICED = 2

# Anomaly kinds (ANOM_* in the header): indexes into struct netns_anomalies, by metric label.
ANOMALIES = {
    "queue_over_budget": 0,
    "redirect_miss": 1,
    "early_tcp_send": 2,
    "splice_reader": 3,
}
ANOM_MAX = 4
ANOM_COMM_LEN = 16
DEFAULT_QUEUE_BUDGET = 4 << 20  # SOCKOPS_QUEUE_BUDGET
DEFAULT_PROXY_UID = 1337  # SOCKOPS_PROXY_UID: Istio's proxy UID (istio-iptables -u)

Ip6 = ctypes.c_uint32 * 4


class SockKey(ctypes.Structure):
    _fields_ = (
        ("netns", ctypes.c_uint64),
        ("client_ip", Ip6),
        ("dest_ip", Ip6),
        ("client_port", ctypes.c_uint32),
        ("dest_port", ctypes.c_uint32),
        ("role", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class LateTuple(ctypes.Structure):
    _fields_ = (
        ("netns", ctypes.c_uint64),
        ("local_ip", Ip6),
        ("remote_ip", Ip6),
        ("local_port", ctypes.c_uint32),
        ("remote_port", ctypes.c_uint32),
    )


class SynackKey(ctypes.Structure):
    _fields_ = (
        ("netns", ctypes.c_uint64),
        ("client_ip", Ip6),
        ("local_port", ctypes.c_uint32),
        ("isn", ctypes.c_uint32),
    )


class Synack(ctypes.Structure):
    _fields_ = (("conn", SockKey), ("ambiguous", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class PodIp(ctypes.Structure):
    _fields_ = (("ip", Ip6),)


class Pending(ctypes.Structure):
    _fields_ = (("tag", ctypes.c_uint64),)


class SockState(ctypes.Structure):
    _fields_ = (
        ("decision", ctypes.c_uint32),
        ("in_map", ctypes.c_uint32),
        ("cookie", ctypes.c_uint64),
        ("key", SockKey),
        ("peer_fin", ctypes.c_uint32),
        ("peer_claimed", ctypes.c_uint32),
        ("origin", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class ConnState(ctypes.Structure):
    """A paired connection's half-close hand-off bits (struct conn_state), keyed by client cookie."""

    _fields_ = (("flags", ctypes.c_uint64 * 2),)


class ProcKey(ctypes.Structure):
    """A process as the reader hook knows it (struct proc_key): tgid and its leader's start time."""

    _fields_ = (("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("start_time", ctypes.c_uint64))


class ProcReader(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("splices", ctypes.c_uint64))


class PortKey(ctypes.Structure):
    _fields_ = (("netns", ctypes.c_uint64), ("port", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class PortInfo(ctypes.Structure):
    _fields_ = (("owner", ProcKey), ("flags", ctypes.c_uint64))


class NetnsConf(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("capture_out", ctypes.c_uint16),
        ("capture_in", ctypes.c_uint16),
        ("local_ip", Ip6 * NETNS_LOCAL_IPS),
    )


class NetnsStats(ctypes.Structure):
    _fields_ = (
        ("redirected_bytes", ctypes.c_uint64),
        ("redirected_msgs", ctypes.c_uint64),
        ("misses", ctypes.c_uint64),
        ("sockets_inserted", ctypes.c_uint64),
        ("connections_passed", ctypes.c_uint64),
    )


class NetnsAnomalies(ctypes.Structure):
    """Per sending namespace: count, last pid and last comm of each anomaly kind (ANOMALIES)."""

    _fields_ = (
        ("count", ctypes.c_uint64 * ANOM_MAX),
        ("pid", ctypes.c_uint32 * ANOM_MAX),
        ("comm", (ctypes.c_char * ANOM_COMM_LEN) * ANOM_MAX),
    )


def ip_to_words(addr: str) -> Ip6:
    """An address as the header stores it: IPv6 bytes, IPv4 mapped, each word in network order."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    raw = ip.packed
    words = Ip6()
    for i in range(4):
        words[i] = int.from_bytes(raw[4 * i : 4 * i + 4], "little" if socket.htonl(1) != 1 else "big")
    return words


def words_to_ip(words: Ip6) -> str:
    order = "little" if socket.htonl(1) != 1 else "big"
    raw = b"".join(int(w).to_bytes(4, order) for w in words)
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip)


@dataclass(frozen=True)
class NetnsSettings:
    """What the agent writes for one enabled network namespace."""

    sidecar: bool = False
    capture_out: int = 15001
    capture_in: int = 15006
    local_ips: tuple[str, ...] = ()
    # Entries the agent wrote carry NETNS_F_AGENT: its resync removes those it no longer wants and
    # leaves entries made by hand (`sockops enable`) alone.
    managed: bool = False

    def to_struct(self) -> NetnsConf:
        conf = NetnsConf()
        conf.flags = (NETNS_F_SIDECAR if self.sidecar else 0) | (NETNS_F_AGENT if self.managed else 0)
        conf.capture_out = self.capture_out
        conf.capture_in = self.capture_in
        for i, ip in enumerate(self.local_ips[:NETNS_LOCAL_IPS]):
            conf.local_ip[i] = ip_to_words(ip)
        return conf

    @classmethod
    def from_struct(cls, conf: NetnsConf) -> NetnsSettings:
        ips = tuple(words_to_ip(conf.local_ip[i]) for i in range(NETNS_LOCAL_IPS) if any(conf.local_ip[i]))
        return cls(
            sidecar=bool(conf.flags & NETNS_F_SIDECAR),
            capture_out=conf.capture_out,
            capture_in=conf.capture_in,
            local_ips=ips,
            managed=bool(conf.flags & NETNS_F_AGENT),
        )
