"""Observe mode: what a pod's programs would get from sockops, read from /proc without BPF.

A pod annotated ``sockops.io/accelerate: "observe"`` is resolved like an accelerated one but
never enabled; instead the reconciler asks :func:`scan` what its programs' TCP sockets are and
whether sockops would accelerate them, so a platform team can look before it leaps.

What sockops does with a socket depends on two things /proc shows (docs/DATAPLANE.md, "Who may be
redirected to"):

* its **role**: a socket made by ``connect()`` ("connected", a client) or by ``accept()``
  ("accepted", a server end). /proc does not say which, so an established socket whose local port
  is one the namespace listens on is taken as accepted, any other as connected;
* its **style**: whether its file is ``O_NONBLOCK`` (``flags:`` in /proc/PID/fdinfo/FD), i.e. read
  by an event loop that never sleeps in ``recv()``, or blocking.

A connected blocking socket is never given a psock (plain TCP, ``blocking_reader``), and neither
is the server end of such a client; an accepted blocking socket is accelerated but exposed to the
spurious EAGAIN of docs/KERNEL-NOTES.md §1. A splice() reader cannot be seen in /proc at all (§3):
the data plane's reader hook (bpf/reader.bpf.c) counts the splice() calls of an observed pod's
programs, and the reconciler adds what it saw to the report (``splice``).

Why /proc and not BPF: observing must never change what the kernel does with the pod's sockets,
and a scan of a few hundred file descriptors once per resync is cheap. It is bounded (processes
and sockets per pod), skips processes that vanish while it reads them, and never raises: a pod
that cannot be read gets a report with ``error`` set, and the agent goes on.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("sockops.observe")

O_NONBLOCK = 0o4000
MAX_PROCESSES = 256  # per pod
MAX_SOCKETS = 4096  # per pod
MAX_PIDS_SHOWN = 8  # per program, in the report

CONNECTED, ACCEPTED = "connected", "accepted"
NONBLOCKING, BLOCKING = "nonblocking", "blocking"
ACCELERATED, PLAIN_TCP, EXPOSED = "accelerated", "plain_tcp", "accelerated_exposed"
VERDICT_TEXT = {ACCELERATED: "accelerated", PLAIN_TCP: "plain TCP", EXPOSED: "accelerated but exposed"}

# /proc/net/tcp states (include/net/tcp_states.h). LISTEN sockets are not connections; the
# handshake states have no settled role yet; TIME_WAIT and CLOSE have no file (inode 0).
TCP_LISTEN = 0x0A
CONNECTION_STATES = frozenset({0x01, 0x04, 0x05, 0x08, 0x09, 0x0B})  # ESTABLISHED and half-closed ones

CAVEATS = (
    "splice() readers (Go io.Copy between two TCP connections, HAProxy's splice paths) cannot read "
    "redirected bytes on this kernel (docs/KERNEL-NOTES.md §3); /proc cannot show them: the reader "
    "hook sees their splice() calls (a node that allows raw tracepoints), names them below, and "
    "keeps their sockets on plain TCP once the pod is enabled",
    "a connected socket is accelerated only when its server is in this pod, in another enabled "
    "pod of the node, or behind the pod's sidecar (docs/DATAPLANE.md, 'Sockets that never get a psock')",
)

REASONS = {
    (
        CONNECTED,
        NONBLOCKING,
        ACCELERATED,
    ): "an O_NONBLOCK client (event loop) joins the sockhash at its handshake",
    (CONNECTED, BLOCKING, PLAIN_TCP): (
        "a blocking client is never given a psock: plain TCP for its whole life (blocking_reader)"
    ),
    (ACCEPTED, NONBLOCKING, ACCELERATED): "a server end read by an event loop: never sleeps in recv()",
    (ACCEPTED, BLOCKING, EXPOSED): (
        "a blocking server end: a spurious EAGAIN if it half-closes after reading and then blocks "
        "in recv(), or another thread half-closes it while one sleeps in recv() "
        "(docs/KERNEL-NOTES.md §1)"
    ),
    (ACCEPTED, NONBLOCKING, PLAIN_TCP): "its client (in this pod) is blocking: the connection stays on TCP",
    (ACCEPTED, BLOCKING, PLAIN_TCP): "its client (in this pod) is blocking: the connection stays on TCP",
}

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class TcpEntry:
    """One line of /proc/PID/net/tcp or tcp6."""

    inode: int
    state: int
    local: Endpoint
    remote: Endpoint


@dataclass(frozen=True)
class Group:
    """Sockets of one program that sockops would treat alike."""

    role: str
    style: str
    verdict: str
    sockets: int

    @property
    def reason(self) -> str:
        return REASONS[(self.role, self.style, self.verdict)]

    def to_json(self) -> dict[str, object]:
        return {
            "role": self.role,
            "style": self.style,
            "verdict": self.verdict,
            "sockets": self.sockets,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Program:
    name: str  # /proc/PID/comm
    exe: str | None  # basename of /proc/PID/exe, when readable
    pids: tuple[int, ...]
    groups: tuple[Group, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "program": self.name,
            "exe": self.exe,
            "processes": len(self.pids),
            "pids": list(self.pids[:MAX_PIDS_SHOWN]),
            "groups": [g.to_json() for g in self.groups],
        }


@dataclass(frozen=True)
class Report:
    """What one scan of a pod found; ``error`` set when the pod could not be read at all."""

    at: float
    processes: int = 0
    sockets: int = 0
    programs: tuple[Program, ...] = ()
    capped: tuple[str, ...] = ()
    error: str | None = None
    caveats: tuple[str, ...] = CAVEATS
    # (splice() calls, program, pid of the last) seen by the reader hook since observing began
    splice: tuple[int, str, int] | None = None

    def totals(self) -> dict[tuple[str, str, str], int]:
        """Sockets by (role, style, verdict) over every program: the metric's series."""
        out: Counter[tuple[str, str, str]] = Counter()
        for p in self.programs:
            for g in p.groups:
                out[(g.role, g.style, g.verdict)] += g.sockets
        return dict(out)

    def to_json(self) -> dict[str, object]:
        return {
            "at": round(self.at, 3),
            "processes": self.processes,
            "sockets": self.sockets,
            "programs": [p.to_json() for p in self.programs],
            "capped": list(self.capped),
            "error": self.error,
            "caveats": list(self.caveats),
            "splice_readers": None
            if self.splice is None
            else {"calls": self.splice[0], "program": self.splice[1], "pid": self.splice[2]},
        }


# -- reading /proc ----------------------------------------------------------------------------------


def _address(hexaddr: str) -> str:
    """/proc/net/tcp's address (host-order 32-bit words in hex) as text; IPv4-mapped shown as IPv4,
    so a v4 client and a dual-stack server's view of it compare equal."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(words)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _endpoint(field_: str) -> Endpoint:
    host, port = field_.split(":")
    return _address(host), int(port, 16)


def parse_tcp_table(text: str) -> list[TcpEntry]:
    """The lines of a /proc/net/tcp or tcp6 file; malformed lines are skipped."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            out.append(TcpEntry(int(parts[9]), int(parts[3], 16), _endpoint(parts[1]), _endpoint(parts[2])))
        except ValueError:
            continue
    return out


def read_tcp_tables(proc: Path, pid: int) -> list[TcpEntry]:
    """The TCP sockets of ``pid``'s network namespace (/proc/PID/net shows the pid's netns)."""
    entries: list[TcpEntry] = []
    for name in ("tcp", "tcp6"):
        try:
            entries += parse_tcp_table((proc / str(pid) / "net" / name).read_text())
        except FileNotFoundError:
            if name == "tcp":
                raise  # the process is gone; tcp6 alone is missing without IPv6
    return entries


def _fd_flags(proc: Path, pid: int, fd: str) -> int | None:
    try:
        for line in (proc / str(pid) / "fdinfo" / fd).read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _socket_fds(proc: Path, pid: int) -> Iterable[tuple[str, int]]:
    """(fd, socket inode) of every socket the process has open."""
    for fd in os.listdir(proc / str(pid) / "fd"):
        try:
            target = os.readlink(proc / str(pid) / "fd" / fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            yield fd, int(target[8:-1])


def _program(proc: Path, pid: int) -> tuple[str, str | None]:
    name = (proc / str(pid) / "comm").read_text().strip()
    try:
        exe: str | None = os.path.basename(os.readlink(proc / str(pid) / "exe"))
    except OSError:
        exe = None  # a kernel thread, or not permitted: the comm still names it
    return name, exe


K = TypeVar("K")


def netns_pids(
    targets: Mapping[K, Path], proc: Path = Path("/proc"), limit: int = MAX_PROCESSES
) -> tuple[dict[K, list[int]], set[K]]:
    """The processes in each target network namespace, in one pass over /proc.

    A process is in a namespace when its /proc/PID/ns/net is the same file (st_dev, st_ino) as the
    namespace's path. Returns pids per target (at most ``limit`` each) and the targets that had
    more. A target whose path cannot be read is left out.
    """
    ids: dict[tuple[int, int], list[K]] = {}
    for key, path in targets.items():
        try:
            st = os.stat(path)
        except OSError:
            continue
        ids.setdefault((st.st_dev, st.st_ino), []).append(key)
    found: dict[K, list[int]] = {k: [] for keys in ids.values() for k in keys}
    capped: set[K] = set()
    if not ids:
        return found, capped
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(proc / entry / "ns" / "net")
        except OSError:
            continue
        for key in ids.get((st.st_dev, st.st_ino), ()):
            if len(found[key]) < limit:
                found[key].append(int(entry))
            else:
                capped.add(key)
    return found, capped


@dataclass
class _Sock:
    pid: int
    inode: int
    nonblocking: bool
    entry: TcpEntry


@dataclass
class _Scan:
    programs: dict[tuple[str, str | None], list[int]] = field(default_factory=dict)
    socks: list[_Sock] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    processes: int = 0


def _scan_process(proc: Path, pid: int, table: Mapping[int, TcpEntry], scan: _Scan, max_sockets: int) -> bool:
    """Add one process's TCP connection sockets; False once the socket cap is reached."""
    name, exe = _program(proc, pid)
    found: list[_Sock] = []
    for fd, inode in _socket_fds(proc, pid):
        entry = table.get(inode)
        if entry is None or inode in scan.seen:
            continue  # not a TCP connection of this namespace, or shared with a process already seen
        flags = _fd_flags(proc, pid, fd)
        if flags is None:
            continue  # the fd was closed meanwhile
        scan.seen.add(inode)
        found.append(_Sock(pid, inode, bool(flags & O_NONBLOCK), entry))
        if len(scan.socks) + len(found) >= max_sockets:
            break
    scan.programs.setdefault((name, exe), []).append(pid)
    scan.processes += 1
    scan.socks += found
    return len(scan.socks) < max_sockets


def _verdicts(scan: _Scan, listening: set[int]) -> dict[int, tuple[str, str, str]]:
    """Socket inode -> (role, style, verdict)."""
    out: dict[int, tuple[str, str, str]] = {}
    clients: dict[Endpoint, list[bool]] = {}  # local endpoint of connected sockets -> their styles
    roles = {s.inode: ACCEPTED if s.entry.local[1] in listening else CONNECTED for s in scan.socks}
    for s in scan.socks:
        if roles[s.inode] == CONNECTED:
            clients.setdefault(s.entry.local, []).append(s.nonblocking)
    for s in scan.socks:
        role, style = roles[s.inode], NONBLOCKING if s.nonblocking else BLOCKING
        if role == CONNECTED:
            verdict = ACCELERATED if s.nonblocking else PLAIN_TCP
        else:
            # The server end of a blocking client finds no pending entry: never inserted. Only
            # a client in this pod can be seen; two with one endpoint (docs/DATAPLANE.md F14)
            # tell nothing.
            peer = clients.get(s.entry.remote, [])
            if len(peer) == 1 and not peer[0]:
                verdict = PLAIN_TCP
            else:
                verdict = ACCELERATED if s.nonblocking else EXPOSED
        out[s.inode] = (role, style, verdict)
    return out


def scan_pids(
    pids: Iterable[int],
    proc: Path = Path("/proc"),
    max_sockets: int = MAX_SOCKETS,
    capped: Iterable[str] = (),
    clock: Callable[[], float] = time.time,
) -> Report:
    """The report for processes that share one network namespace (see the module docstring)."""
    pids = list(pids)
    caps = list(capped)
    scan = _Scan()
    table: dict[int, TcpEntry] | None = None
    listening: set[int] = set()
    for pid in pids:
        try:
            if table is None:
                entries = read_tcp_tables(proc, pid)
                listening = {e.local[1] for e in entries if e.state == TCP_LISTEN}
                table = {e.inode: e for e in entries if e.inode and e.state in CONNECTION_STATES}
            if not _scan_process(proc, pid, table, scan, max_sockets):
                caps.append(f"sockets: stopped at {max_sockets}")
                break
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended while it was read
        except OSError as e:
            log.debug("cannot read a process", extra={"fields": {"pid": pid, "error": str(e)}})
            continue
    verdicts = _verdicts(scan, listening)
    per_program: dict[tuple[str, str | None], Counter[tuple[str, str, str]]] = {}
    owner = {pid: key for key, ps in scan.programs.items() for pid in ps}
    for s in scan.socks:
        per_program.setdefault(owner[s.pid], Counter())[verdicts[s.inode]] += 1
    programs = tuple(
        Program(
            name,
            exe,
            tuple(sorted(ps)),
            tuple(Group(r, st, v, n) for (r, st, v), n in sorted(per_program.get((name, exe), {}).items())),
        )
        for (name, exe), ps in sorted(scan.programs.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
    )
    return Report(clock(), scan.processes, len(scan.socks), programs, tuple(caps))


def scan(
    targets: Mapping[K, Path],
    proc: Path = Path("/proc"),
    max_processes: int = MAX_PROCESSES,
    max_sockets: int = MAX_SOCKETS,
    clock: Callable[[], float] = time.time,
) -> dict[K, Report]:
    """A report per target network namespace path (one pass over /proc for all). Never raises:
    what cannot be read becomes a report with ``error`` set."""
    try:
        members, over = netns_pids(targets, proc, max_processes)
    except Exception as e:  # observe mode must never disturb the agent
        log.warning("observe: cannot list processes", extra={"fields": {"error": str(e)}})
        return {k: Report(clock(), error=f"cannot list processes: {e}") for k in targets}
    out: dict[K, Report] = {}
    for key in targets:
        if key not in members:
            out[key] = Report(clock(), error=f"cannot read the network namespace {targets[key]}")
            continue
        caps = [f"processes: only the first {max_processes} scanned"] if key in over else []
        try:
            out[key] = scan_pids(members[key], proc, max_sockets, caps, clock)
        except Exception as e:
            log.warning(
                "observe: scan failed", extra={"fields": {"netns": str(targets[key]), "error": str(e)}}
            )
            out[key] = Report(clock(), error=f"scan failed: {e}")
    return out


# -- showing it -------------------------------------------------------------------------------------


def render(report: Mapping[str, Any] | None) -> list[str]:
    """Readable lines for a report's JSON (``sockops status``, ``kubectl sockops status``)."""
    if not report:
        return ["observed: not scanned yet"]
    when = time.strftime("%H:%M:%S", time.localtime(float(report.get("at") or 0)))
    if report.get("error"):
        return [f"observed at {when}: ! {report['error']}"]
    lines = [f"observed at {when}: {report['processes']} processes, {report['sockets']} TCP sockets"]
    lines += [f"! capped: {c}" for c in report.get("capped") or []]
    idle = []
    for p in report.get("programs") or []:
        exe = f" ({p['exe']})" if p.get("exe") and p["exe"] != p["program"] else ""
        if not p["groups"]:
            idle.append(f"{p['program']}{exe}")
            continue
        lines.append(f"  {p['program']}{exe}, {p['processes']} process{'es' if p['processes'] != 1 else ''}:")
        for g in p["groups"]:
            verdict = VERDICT_TEXT.get(g["verdict"], g["verdict"])
            lines.append(f"    {g['sockets']:>4} {g['role']} {g['style']}: {verdict} ({g['reason']})")
    if idle:
        lines.append(f"  without TCP connections: {', '.join(idle)}")
    if splice := report.get("splice_readers"):
        lines.append(
            f"! splice() on TCP sockets: {splice['calls']} calls, last by {splice['program']} "
            f"(pid {splice['pid']}): known to the reader hook, its sockets stay on plain TCP "
            f"(docs/DATAPLANE.md, Splice readers)"
        )
    lines += [f"note: {c}" for c in report.get("caveats") or []]
    return lines
