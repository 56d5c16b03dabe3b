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

Connections through a NAT (Istio's REDIRECT: app to Envoy through 15001, Envoy to Envoy through
15006) have no mirrored 4-tuples, so before the insert step the agent names them from each
namespace's conntrack table (pyroute2's conntrack netlink): conntrack keeps the client's own
4-tuple (the original direction) and the server's (the reply direction) in one entry, and keeps
every reply tuple unique, so the two views it gives name the two ends of one connection exactly.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sockops import layout, libbpf, netns
from sockops.errors import SockopsError

log = logging.getLogger(__name__)

PROGRAM = "bpf_iter__tcp"  # BPF_ITER(tcp) in bpf/late.bpf.c
MODE_MAP = "late_mode"
MODE_INSERT, MODE_SETTLE = 0, 1  # LATE_INSERT / LATE_SETTLE in bpf/late.bpf.c
SLOT_MODE, SLOT_WAITING, SLOT_PASS = 0, 1, 2  # LATE_SLOT_* of the mode map
NAT_MAP = "late_nat"

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class NatConnection:
    """One conntrack entry whose reply is not its original direction reversed: a NAT changed it."""

    client: Endpoint  # the client socket's local address (original source)
    dest: Endpoint  # what the client connected to (original destination)
    server: Endpoint  # the server socket's local address (reply source)
    server_sees: Endpoint  # the client as the server socket sees it (reply destination)


def nat_connections(path: Path) -> list[NatConnection]:
    """The NATed TCP connections in one namespace's conntrack table."""
    from pyroute2 import Conntrack

    with netns.entered(path):  # the netlink socket is made, and bound, at its first request
        ct = Conntrack()
        try:
            entries = list(ct.dump_entries())
        finally:
            ct.close()
    found = []
    for e in entries:
        o, r = e.tuple_orig, e.tuple_reply
        if o.proto != socket.IPPROTO_TCP:
            continue
        if (r.saddr, r.sport, r.daddr, r.dport) == (o.daddr, o.dport, o.saddr, o.sport):
            continue  # no NAT: the iterator pairs mirrored tuples by itself
        found.append(
            NatConnection((o.saddr, o.sport), (o.daddr, o.dport), (r.saddr, r.sport), (r.daddr, r.dport))
        )
    return found


def _owner(ip: str, here: int, node_pods: Mapping[str, int]) -> int:
    """The enabled namespace an address of a connection seen in namespace ``here`` belongs to."""
    if ipaddress.ip_address(ip).is_loopback:
        return here
    return node_pods.get(ip, 0)


def _tuple(ns: int, local: Endpoint, remote: Endpoint) -> layout.LateTuple:
    return layout.LateTuple(
        ns, layout.ip_to_words(local[0]), layout.ip_to_words(remote[0]), local[1], remote[1]
    )


def nat_names(
    found: Mapping[int, list[NatConnection]], node_pods: Mapping[str, int]
) -> list[tuple[layout.LateTuple, layout.SockKey]]:
    """What each end of each NATed connection sees -> the connection's name and that end's role
    (struct late_tuple). Both ends must be in enabled namespaces of this node, else neither is
    named (a named end whose peer never joins would only be taken out again)."""
    names = []
    for here, conns in found.items():
        for c in conns:
            client_ns = _owner(c.client[0], here, node_pods)
            server_ns = _owner(c.server[0], here, node_pods)
            if not client_ns or not server_ns:
                continue
            key = layout.SockKey(
                client_ns,
                layout.ip_to_words(c.client[0]),
                layout.ip_to_words(c.dest[0]),
                c.client[1],
                c.dest[1],
            )
            server_key = layout.SockKey.from_buffer_copy(key)
            key.role, server_key.role = layout.ROLE_CLIENT, layout.ROLE_SERVER
            names.append((_tuple(client_ns, c.client, c.dest), key))
            names.append((_tuple(server_ns, c.server, c.server_sees), server_key))
    return names


@dataclass(frozen=True)
class PassResult:
    """What one pass visited; counts of what joined or left are the data plane's own counters."""

    namespaces: int
    failed: tuple[str, ...] = ()  # namespaces that could not be entered (a pod that just went away)
    waiting: int = 0  # directions left on TCP because their reader was behind: pass again soon


class LateInserter:
    """Runs late-insertion passes through an iterator link this object owns.

    The link is not pinned: it only lives while the agent that runs passes does, and a new agent
    makes its own. Passes are serialized (one lock), so the steps of two passes never interleave.
    """

    def __init__(self, prog_fd: int, mode_table: object, nat_table: object) -> None:
        self._mode = mode_table
        self._nat = nat_table
        self._pass = 0
        self._lock = threading.Lock()
        self._link = libbpf.link_create(
            prog_fd, 0, libbpf.BPF_TRACE_ITER, "the tcp iterator", "this kernel has no bpf_iter/tcp (5.9)"
        )

    def close(self) -> None:
        with self._lock:
            if self._link >= 0:
                os.close(self._link)
                self._link = -1

    def run(self, namespaces: Mapping[int, Path], node_pods: Mapping[str, int] | None = None) -> PassResult:
        """One pass over the enabled namespaces ({netns cookie: path}); ``node_pods`` maps the
        enabled pods' IPs to their cookies (the node_pods map), to place the ends of NATed
        connections. Never raises for a namespace that vanished: the pass goes on with the others
        (a pod can die at any time)."""
        with self._lock:
            if self._link < 0:
                raise SockopsError("late insertion was closed")
            failed: dict[Path, str] = {}  # the first error of each namespace
            visited = 0
            found: dict[int, list[NatConnection]] = {}
            for cookie, path in namespaces.items():
                try:
                    found[cookie] = nat_connections(path)
                except Exception as e:  # pyroute2's NetlinkError is no OSError; never fatal
                    failed[path] = f"{path}: reading conntrack (needs CAP_NET_ADMIN): {e}"
            self._name_nat(nat_names(found, node_pods or {}))
            self._pass = (self._pass + 1) & 0xFFFFFFFF
            self._mode[ctypes.c_int(SLOT_PASS)] = ctypes.c_uint32(self._pass)  # type: ignore[index]
            for mode in (MODE_INSERT, MODE_SETTLE):
                self._set_mode(mode)
                self._mode[ctypes.c_int(SLOT_WAITING)] = ctypes.c_uint32(0)  # type: ignore[index]
                for path in namespaces.values():
                    try:
                        self._visit(path)
                        visited += mode == MODE_INSERT
                    except (OSError, SockopsError) as e:
                        failed.setdefault(path, f"{path}: {e}")
            waiting = self._mode[ctypes.c_int(SLOT_WAITING)].value  # type: ignore[index]
            self._set_mode(MODE_INSERT)
            return PassResult(visited, tuple(failed.values()), waiting)

    def _name_nat(self, names: list[tuple[layout.LateTuple, layout.SockKey]]) -> None:
        """Replace the names of NATed connections; those that do not fit in the map (sized like
        the pending map) stay unnamed, so their sockets stay on TCP: the pass goes on."""
        table = self._nat
        table.clear()  # type: ignore[attr-defined]
        for i, (t, key) in enumerate(names):
            try:
                table[t] = key  # type: ignore[index]
            except Exception as e:  # bcc raises a bare Exception for a full map
                log.warning(
                    "late insertion: NATed connections left unnamed",
                    extra={"fields": {"named": i, "unnamed": len(names) - i, "error": str(e)}},
                )
                return

    def _set_mode(self, mode: int) -> None:
        self._mode[ctypes.c_int(SLOT_MODE)] = ctypes.c_uint32(mode)  # type: ignore[index]

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
        bpf = plane.bpf  # type: ignore[attr-defined]
        return LateInserter(prog.fd, bpf[MODE_MAP], bpf[NAT_MAP])
    except SockopsError as e:
        log.warning("late insertion unavailable", extra={"fields": {"error": str(e)}})
        return None
