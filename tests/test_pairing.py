"""Exact pairing (issue 11): a connection's bytes only ever reach its own peer.

The data plane pairs a server socket with a client socket of the same pod. The adversary here is
the pod itself: two of its sockets that leave from the same pod IP and source port towards
different destinations (an explicit SO_REUSEADDR bind, or the kernel's own choice: ephemeral
ports are unique per 4-tuple, not per socket). The case of the issue: Envoy's (UID 1337)
upstream to a server-first service in another pod waits for the server's greeting, and an app
connection to a Service address (REDIRECTed to Envoy's 15001) leaves from the same IP and port.
A server end that pairs by the client's (ip, port) alone pairs Envoy's downstream socket of the
app's connection with the upstream: the upstream's credentials go into the app's connection,
the app's response into the upstream.

Every case is real: the kernel's BPF programs, Istio's nat rules, a real Envoy as UID 1337, real
sockets (tests/support/pairing_peer.py, whose sockets carry the owner UID the capture rules match). Each
checks content end to end: every connection's request arrives at its own server, named in its
header and with the sha256 the client sent, every response and greeting arrives at its own client,
and nothing else arrives anywhere (bytes after the exchange are counted too). Where a connection
is unambiguous (its origin is its own) it must also be accelerated: at least 90 % of its bytes
redirected, per the pod's ``redirected_bytes``, in the same run.

How the failures look on the data plane that pairs by origin alone (before issue 11's fix) is
written down in docs/RELIABILITY.md (exact pairing), so a fix can be checked against them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import selectors
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Plane, wait_drained
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from support.pairing_peer import DIGEST, HEADER, greeting, header, stream

from lab.podlab import APP_UID, PROXY_UID, Lab, Pod, Service

pytestmark = [pytest.mark.kernel, pytest.mark.envoy]

PEER = Path(__file__).resolve().parent / "support" / "pairing_peer.py"
POD_IP, POD_IP6 = "10.244.1.10", "fd00:10:244::10"
UPSTREAM_IP, UPSTREAM_IP6 = "10.244.1.30", "fd00:10:244::30"
APP_PORT = 8080
SVC_PORTS = (8080, 8081, 8082)  # Service ports whose only endpoint is the pod's own 8080
ACCELERATED_SHARE = 0.9
# Explicitly bound source ports lie below the ephemeral range (32768-60999): a kernel-chosen
# port of another connection can never land on one of them by chance.
BOUND_BASE = 21000
KIB = 1024


# -- peers ---------------------------------------------------------------------------------------


@dataclass
class Conn:
    """One connection of a plan (the fields tests/support/pairing_peer.py reads, plus what it is for).

    ``legs``: hops of this connection that sockops can accelerate when its origin is its own
    (3 through the Service, 2 for Envoy's inbound-to-self, 1 on loopback or a direct in-pod
    connection, 0 to a pod that is not enabled). ``shared``: its origin (pod IP, port) is used by
    another socket at the same time, so only correctness is asked of it, not acceleration."""

    id: int
    uid: int
    dest: tuple[str, int]
    server: str
    what: str
    bind: tuple[str, int] | None = None
    family: int = 4
    greet: int = 0
    start_ms: int = 0
    pre_send_ms: int = 20
    req: int = 4 * KIB
    resp: int = 4 * KIB
    timeout: float = 8.0
    legs: int = 0
    shared: bool = False

    def wire(self) -> int:
        """Bytes of one hop of this connection, both directions."""
        return self.greet + HEADER.size + self.req + self.resp + DIGEST

    def plan(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("what", "legs", "shared"):
            d.pop(k)
        return d


PROBE_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1"}


class PeerServer:
    """tests/support/pairing_peer.py listening in a pod; collects one record per finished connection."""

    def __init__(self, pod: Pod, specs: list[dict[str, Any]], uid: int = APP_UID) -> None:
        self.pod = pod
        self.proc = pod.popen(
            [sys.executable, str(PEER), "server", json.dumps(specs)],
            uid=uid,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(15.0):
                pytest.fail(f"pairing peer server in pod {pod.name} did not listen within 15s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            pytest.fail(f"pairing peer server in pod {pod.name} exited: {err}")
        assert json.loads(line)["listening"] == [s["label"] for s in specs], line
        # Each listener reads one connection first, as after a readiness probe: the reader hook
        # then knows its port is read with recv(), so the plan's connections get psocks
        # (docs/DATAPLANE.md, "Splice readers"). Their records are dropped.
        probes = [
            threading.Thread(target=pod.probe, args=(s["port"], PROBE_HOST.get(s["host"], s["host"]), 1))
            for s in specs
        ]
        for t in probes:
            t.start()
        for t in probes:
            t.join()
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10  # the probes' records, before any plan's ``since``
        while len(self.snapshot()) < len(specs) and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self.records.clear()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                rec = json.loads(line)
                rec["arrived"] = time.monotonic()
                with self._lock:
                    self.records.append(rec)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records)


def listener(
    label: str, port: int, host: str = "0.0.0.0", greet: int = 0, delay_ms: int = 0
) -> dict[str, Any]:
    return {"label": label, "host": host, "port": port, "greet": greet, "greet_delay_ms": delay_ms}


def run_plan(
    pod: Pod, groups: list[list[Conn]], parallel: int = 1, stop_after_failures: int = 0, timeout: float = 120
) -> list[dict[str, Any]]:
    """Run the plan in the pod as root (each socket gets its role's UID, see pairing_peer.py)."""
    plan = {
        "parallel": parallel,
        "stop_after_failures": stop_after_failures,
        "groups": [[c.plan() for c in g] for g in groups],
    }
    try:
        argv = [sys.executable, str(PEER), "client"]
        res = pod.run(argv, input=json.dumps(plan), timeout=timeout, text=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"pairing peer client in pod {pod.name} hung for {timeout}s: {e.stderr!r}")
    lines = [line for line in (res.stdout or "").splitlines() if line.strip()]
    if not lines:
        pytest.fail(f"pairing peer client printed nothing (rc {res.returncode}): {res.stderr}")
    out: list[dict[str, Any]] = json.loads(lines[-1])["results"]
    return out


# -- checking ------------------------------------------------------------------------------------


def whose(data: bytes, conns: list[Conn]) -> str:
    """Name the connection a stray piece of bytes belongs to (for the failure message)."""
    if len(data) >= HEADER.size:
        magic, conn, _, _, named = HEADER.unpack(data[: HEADER.size])
        if magic == b"PAIR":
            return f"conn {conn}'s request header (meant for {named.rstrip(bytes(1)).decode()!r})"
    probe = data[:16]
    for c in conns:
        req = stream(c.id, "req", c.req)
        refs = {
            "request": header(c.id, c.req, c.resp, c.server) + req,
            "response": stream(c.id, "resp", c.resp) + hashlib.sha256(req).digest(),
            "greeting": greeting(c.server, c.greet),
        }
        for name, ref in refs.items():
            at = ref.find(probe) if len(probe) >= 8 else -1
            if at >= 0:
                return f"conn {c.id}'s {name}" + (f" (from byte {at})" if at else "")
    return "bytes of no connection of this run"


def problems(
    conns: list[Conn], results: list[dict[str, Any]], servers: list[PeerServer], since: float
) -> list[str]:
    """Everything that was not "each byte at its own peer": empty when the run is clean.

    A server record belongs to this run when it names one of its connections (as its own, or in
    a header that reached the wrong server), or, naming none, when it arrived after ``since``
    (the plan's start): a stray of an earlier plan is never blamed on this one."""
    by_id = {c.id: c for c in conns}
    got = {r["id"]: r for r in results}
    out: list[str] = []
    never = [c.id for c in conns if c.id not in got]
    if never:
        out.append(f"{len(never)} connections never ran (the plan stopped after failures)")
    for c in conns:
        r = got.get(c.id)
        if r is None:
            continue
        if not r["ok"]:
            stray = f", it received {whose(bytes.fromhex(r['got']), conns)}" if r.get("got") else ""
            out.append(f"conn {c.id} ({c.what}) from {r['local']}: {r['error']}{stray}")
    # Server records arrive just after the client's end: wait (bounded) for every clean client's.
    ids = {c.id for c in conns}
    want = {i for i in ids if got.get(i, {}).get("ok")}

    def ours(rec: dict[str, Any]) -> bool:
        named = rec["conn"] if rec["conn"] is not None else rec.get("claimed")
        return named in ids if named is not None else rec["arrived"] >= since

    deadline = time.monotonic() + 5
    while True:
        mine = [rec for s in servers for rec in s.snapshot() if ours(rec)]
        if want <= {rec["conn"] for rec in mine} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    seen: Counter[int] = Counter()
    for rec in mine:
        if rec["conn"] is None:
            stray = whose(bytes.fromhex(rec.get("head", "")), conns) if rec.get("head") else "nothing"
            out.append(
                f"server {rec['server']!r} got {stray} from {rec.get('peer')}: {rec['errors']}"
                f"{' (' + str(rec['extra']) + ' bytes)' if rec.get('extra') else ''}"
            )
            continue
        c = by_id[rec["conn"]]
        seen[c.id] += 1
        if rec["server"] != c.server:
            out.append(f"conn {c.id} ({c.what}) reached server {rec['server']!r}")
        if rec["errors"]:
            stray = f": {whose(bytes.fromhex(rec['head']), conns)}" if rec.get("head") else ""
            out.append(
                f"conn {c.id} ({c.what}) at server {rec['server']!r}: {rec['errors']}"
                f"{' (' + str(rec['extra']) + ' extra bytes)' if rec.get('extra') else ''}{stray}"
            )
        elif got.get(c.id, {}).get("sent") != rec["digest"]:
            out.append(f"conn {c.id} ({c.what}): request digest differs at the server")
    for i in want:
        if seen[i] != 1:
            out.append(f"conn {i} ({by_id[i].what}): {seen[i]} server records (1 expected)")
    return out


def assert_every_byte_at_its_peer(
    conns: list[Conn], results: list[dict[str, Any]], servers: list[PeerServer], since: float
) -> None:
    found = problems(conns, results, servers, since)
    assert not found, (
        f"{len(found)} problems in {len(conns)} connections "
        f"({sum(1 for r in results if not r['ok'])} clients failed):\n  " + "\n  ".join(found[:12])
    )


def unambiguous_bytes(conns: list[Conn]) -> int:
    """Bytes the data plane should have redirected: every hop of every connection whose origin
    is its own and that sends only after its server end can exist (pre_send_ms > 0 or a server
    that speaks first; a client that writes the instant connect() returns may lose the
    first-send race and stay on TCP, which is correct)."""
    return sum(c.legs * c.wire() for c in conns if not c.shared and (c.pre_send_ms > 0 or c.greet))


def redirected(plane: Plane, cookie: int) -> int:
    stats = plane.stats(cookie)
    assert stats is not None, "no per-netns stats for the enabled pod"
    return stats["redirected_bytes"]


def assert_accelerated(before: int, after: int, conns: list[Conn]) -> None:
    """A lower bound: the pod's counter also holds whatever a data plane redirected for the
    shared-origin connections (and their unambiguous later hops through Envoy)."""
    want = unambiguous_bytes(conns)
    assert want > 0
    assert after - before >= ACCELERATED_SHARE * want, (
        f"unambiguous connections: {after - before} bytes redirected of {want} "
        f"({(after - before) / want:.0%}, at least {ACCELERATED_SHARE:.0%} expected)"
    )


# -- the pods ------------------------------------------------------------------------------------


@dataclass
class Mesh:
    """The enabled sidecar pod (its app server on 8080, loopback servers) and a server-first
    upstream in another pod that is not enabled (Envoy's upstream to it is never paired)."""

    plane: Plane
    pod: Pod
    upstream: Pod
    cookie: int
    servers: list[PeerServer] = field(default_factory=list)
    # Connection ids are unique within a test: the servers outlive single plans.
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def svc(self) -> str:
        return self.pod.service_ip

    def conn(self, **kw: Any) -> Conn:
        return Conn(id=next(self.ids), **kw)

    def envoy_upstream(self, port: int, server: str, what: str, **kw: Any) -> Conn:
        """Envoy's upstream (UID 1337, never captured) to a service in another pod, from an origin
        another socket shares: it waits for the 64-byte greeting (a server-first one), then sends
        19 bytes of credentials."""
        return self.conn(
            uid=PROXY_UID,
            dest=(UPSTREAM_IP, port),
            server=server,
            greet=64,
            pre_send_ms=0,
            req=19,
            resp=64,
            shared=True,
            what=what,
            **kw,
        )

    def run(self, groups: list[list[Conn]], **kw: Any) -> tuple[list[Conn], list[dict[str, Any]]]:
        conns = [c for g in groups for c in g]
        return conns, run_plan(self.pod, groups, **kw)

    def check(self, groups: list[list[Conn]], **kw: Any) -> list[Conn]:
        """Run the plan; every byte at its own peer, the unambiguous connections accelerated."""
        before, since = redirected(self.plane, self.cookie), time.monotonic()
        conns, results = self.run(groups, **kw)
        assert_every_byte_at_its_peer(conns, results, self.servers, since)
        self.assert_no_stray_records()
        assert_accelerated(before, redirected(self.plane, self.cookie), conns)
        return conns

    def assert_no_stray_records(self) -> None:
        """No server, at any time of the test, received anything but exchanges it completed
        (catches a stray that arrives after its own plan was checked)."""
        time.sleep(0.5)
        bad = [rec for s in self.servers for rec in s.snapshot() if rec["errors"]]
        assert not bad, f"servers received bytes that were not theirs: {bad[:5]}"


UPSTREAM_LISTENERS = [
    listener("q-first", 7000, "::", greet=64, delay_ms=600),  # server-first (SMTP, MySQL, ...)
    listener("q", 7001, "::"),  # client-first
    listener("q-slow", 7002, "::", greet=64, delay_ms=2500),  # greets only after 2.5 s
    listener("q-fast", 7003, "::", greet=64, delay_ms=150),
]


def make_mesh(
    plane: Plane,
    lab: Lab,
    ipv6: bool = False,
    app_host: str = "0.0.0.0",
    sysctls: dict[str, str] | None = None,
) -> Mesh:
    services = [Service(p, POD_IP, APP_PORT) for p in SVC_PORTS]
    if ipv6:
        services += [Service(p, POD_IP6, APP_PORT) for p in SVC_PORTS]
    pod = lab.add_pod("app", ip=POD_IP, ipv6=POD_IP6 if ipv6 else None, services=services)
    upstream = lab.add_pod("upstream", ip=UPSTREAM_IP, ipv6=UPSTREAM_IP6 if ipv6 else None, sidecar=False)
    cookie = plane.enable(pod)
    mesh = Mesh(plane, pod, upstream, cookie)
    lo = "::1" if ipv6 else "127.0.0.1"
    mesh.servers.append(
        PeerServer(
            pod,
            [
                listener("app", APP_PORT, app_host),
                listener("lo", 9000, lo),
                listener("lo-first", 9001, lo, greet=64, delay_ms=300),
                listener("lo-slow", 9002, lo, greet=64, delay_ms=2500),
                listener("lo-2", 9003, lo),
            ],
        )
    )
    mesh.servers.append(PeerServer(upstream, UPSTREAM_LISTENERS))
    # after the servers' probes, which need ports of their own
    for key, value in (sysctls or {}).items():
        res = pod.run(["sysctl", "-w", f"{key}={value}"], text=True, timeout=10)
        assert res.returncode == 0, res.stderr
    return mesh


@pytest.fixture
def mesh(dataplane: Plane, lab: Lab) -> Mesh:
    return make_mesh(dataplane, lab)


# -- the cases -----------------------------------------------------------------------------------


def issue_pair(m: Mesh, port: int, app_first: bool) -> list[Conn]:
    """The issue's two sockets on one (pod IP, port): Envoy's upstream to a server-first service
    of another pod (reads the greeting, then sends 19 bytes of credentials), and an app
    connection to the Service. ``app_first``: the app sends at once (its response then races the
    upstream's greeting), else it sends after the upstream's credentials went out."""
    src = (POD_IP, port)
    return [
        m.envoy_upstream(
            7000,
            "q-first",
            f"Envoy upstream {POD_IP}:{port} -> server-first {UPSTREAM_IP}:7000",
            bind=src,
        ),
        m.conn(
            uid=APP_UID,
            bind=src,
            dest=(m.svc, 8080),
            server="app",
            start_ms=200,
            pre_send_ms=20 if app_first else 1200,
            req=110,
            resp=200,
            legs=3,
            shared=True,
            what=f"app {POD_IP}:{port} -> Service {m.svc}:8080",
        ),
    ]


def controls(m: Mesh, n: int, dest_port: int = 8081, size: int = 256 * KIB) -> list[Conn]:
    """Unambiguous app connections through the Service (kernel-chosen ports, from the usual
    range): the acceleration this run must still show."""
    return [
        m.conn(
            uid=APP_UID,
            dest=(m.svc, dest_port),
            server="app",
            req=size,
            resp=size,
            legs=3,
            what=f"app -> Service {m.svc}:{dest_port} (unambiguous)",
        )
        for _ in range(n)
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("order", ["upstream-sends-first", "app-sends-first"])
def test_shared_port_by_explicit_bind(mesh: Mesh, order: str) -> None:
    """Issue 11 as reported: Envoy's upstream (UID 1337) to a server-first service in another
    pod and an app connection to a Service address, both bound to the pod IP and one port with
    SO_REUSEADDR, towards different destinations. Three rounds, each on a fresh port, each with
    two unambiguous connections beside it that must be accelerated."""
    groups = [
        issue_pair(mesh, BOUND_BASE + r, app_first=order == "app-sends-first") + controls(mesh, 2)
        for r in range(3)
    ]
    mesh.check(groups)
    wait_drained(mesh.plane)


@pytest.mark.timeout(120)
def test_shared_port_chosen_by_the_kernel(dataplane: Plane, lab: Lab) -> None:
    """No bind at all: with a one-port ip_local_port_range in the pod's namespace the kernel gives
    Envoy's upstream and the app's connection the same source port (ports are unique per
    4-tuple, not per socket). Both reports of the local address prove it. The unambiguous
    connections here are on loopback (127.0.0.1 is another origin than the pod IP)."""
    m = make_mesh(dataplane, lab, sysctls={"net.ipv4.ip_local_port_range": "40200 40200"})
    pair = [
        m.envoy_upstream(
            7000,
            "q-first",
            "Envoy upstream (kernel-chosen port) -> server-first upstream",
        ),
        m.conn(
            uid=APP_UID,
            dest=(m.svc, 8080),
            server="app",
            start_ms=200,
            pre_send_ms=20,
            req=110,
            resp=200,
            legs=3,
            shared=True,
            what="app (kernel-chosen port) -> Service",
        ),
    ]
    # With one port, every socket of one local address has the same origin: the unambiguous
    # ones here each have an address of their own (127.0.0.1, 127.0.0.2; port 0 = the one port).
    local = [
        m.conn(
            uid=APP_UID,
            bind=(src, 0),
            dest=("127.0.0.1", port),
            server=label,
            req=512 * KIB,
            resp=512 * KIB,
            legs=1,
            what=f"app {src} -> 127.0.0.1:{port} (unambiguous)",
        )
        for src, port, label in (("127.0.0.1", 9000, "lo"), ("127.0.0.2", 9003, "lo-2"))
    ]
    before, since = redirected(m.plane, m.cookie), time.monotonic()
    conns, results = m.run([pair + local])
    ports = {tuple(r["local"] or ()) for r in results if r["id"] in (pair[0].id, pair[1].id)}
    assert ports == {(POD_IP, 40200)}, f"the kernel did not share the port: {results}"
    assert_every_byte_at_its_peer(conns, results, m.servers, since)
    m.assert_no_stray_records()
    assert_accelerated(before, redirected(m.plane, m.cookie), conns)
    wait_drained(m.plane)


@pytest.mark.timeout(120)
def test_upstream_undecided_for_seconds(mesh: Mesh) -> None:
    """Envoy's upstream waits 2.5 s for a server-first greeting (connected, nothing sent): all
    that time its origin is taken. Meanwhile the app connects three times from the same IP and
    port (two Service ports, then the pod's own IP as Envoy would, captured on 15006). And an
    in-pod server-first connection on loopback that also stays silent for 2.5 s must still be
    paired and accelerated once it speaks."""
    m = mesh
    src = (POD_IP, BOUND_BASE + 100)
    waiting = m.envoy_upstream(
        7002,
        "q-slow",
        "Envoy upstream waiting 2.5 s for its greeting",
        bind=src,
    )
    meanwhile = [
        m.conn(
            uid=APP_UID,
            bind=src,
            dest=(m.svc, port),
            server="app",
            start_ms=start,
            legs=3,
            shared=True,
            what=f"app, same origin, -> Service :{port} at +{start} ms",
        )
        for port, start in ((8080, 300), (8081, 900))
    ] + [
        m.conn(
            uid=PROXY_UID,
            bind=src,
            dest=(POD_IP, APP_PORT),
            server="app",
            start_ms=1500,
            legs=2,
            shared=True,
            what="Envoy inbound-to-self, same origin, at +1500 ms",
        )
    ]
    slow_local = m.conn(
        uid=APP_UID,
        dest=("127.0.0.1", 9002),
        server="lo-slow",
        greet=64,
        pre_send_ms=0,
        req=1024 * KIB,
        resp=1024 * KIB,
        timeout=10,
        legs=1,
        what="app -> in-pod server-first 127.0.0.1:9002, silent 2.5 s (unambiguous)",
    )
    m.check([[waiting, *meanwhile, slow_local, *controls(m, 2, dest_port=8082)]])
    wait_drained(m.plane)


@pytest.mark.timeout(120)
def test_envoy_inbound_to_self(mesh: Mesh) -> None:
    """A UID-1337 socket connecting to the pod's own IP:8080 is REDIRECTed to 15006 (Envoy's
    inbound), then Envoy connects to the app from 127.0.0.6. Alone (kernel-chosen ports) both
    hops are accelerated; sharing its origin with Envoy's waiting upstream, it must not be paired
    with that upstream."""
    m = mesh
    alone = [
        m.conn(
            uid=PROXY_UID,
            dest=(POD_IP, APP_PORT),
            server="app",
            req=256 * KIB,
            resp=256 * KIB,
            legs=2,
            what="Envoy inbound-to-self (unambiguous)",
        )
        for _ in range(4)
    ]
    groups = []
    for r in range(3):
        src = (POD_IP, BOUND_BASE + 200 + r)
        upstream = m.envoy_upstream(
            7000,
            "q-first",
            "Envoy upstream -> server-first, waiting",
            bind=src,
        )
        to_self = m.conn(
            uid=PROXY_UID,
            bind=src,
            dest=(POD_IP, APP_PORT),
            server="app",
            start_ms=200,
            legs=2,
            shared=True,
            what="Envoy inbound-to-self, same origin",
        )
        groups.append([upstream, to_self])
    groups[0] += alone
    m.check(groups)
    wait_drained(m.plane)


@pytest.mark.timeout(180)
def test_concurrent_collisions_under_load(mesh: Mesh) -> None:
    """8 workers, 100 groups, 300+ connections: in each group Envoy's upstream (server-first or
    client-first) and two app connections to two Service ports share one source port; between
    them, unambiguous connections. Every digest intact; the unambiguous ones accelerated."""
    m = mesh
    groups: list[list[Conn]] = []
    for g in range(100):
        src = (POD_IP, BOUND_BASE + 1000 + g)
        server_first = g % 2 == 0
        group = [
            m.conn(
                uid=PROXY_UID,
                bind=src,
                dest=(UPSTREAM_IP, 7003 if server_first else 7001),
                server="q-fast" if server_first else "q",
                greet=64 if server_first else 0,
                pre_send_ms=0 if server_first else 100,
                req=19 + g,
                resp=64,
                shared=True,
                what=f"group {g}: Envoy upstream ({'server' if server_first else 'client'}-first)",
            )
        ]
        for k, start in ((0, 30), (1, 60)):
            port = SVC_PORTS[(g + k) % 3]
            group.append(
                m.conn(
                    uid=APP_UID,
                    bind=src,
                    dest=(m.svc, port),
                    server="app",
                    start_ms=start,
                    pre_send_ms=(0, 20, 200)[g % 3],
                    req=(1, 1000, 65536)[(g + k) % 3],
                    resp=(65536, 1, 1000)[(g + k) % 3],
                    legs=3,
                    shared=True,
                    what=f"group {g}: app -> Service :{port}, same origin",
                )
            )
        if g % 4 == 0:
            group += controls(m, 1, dest_port=SVC_PORTS[g % 3], size=64 * KIB)
        groups.append(group)
    m.check(groups, parallel=8, stop_after_failures=6, timeout=170)
    wait_drained(m.plane)


@pytest.mark.timeout(120)
def test_ipv4_client_to_dual_stack_listener(dataplane: Plane, lab: Lab) -> None:
    """The app server listens on [::]:8080 (dual-stack): Envoy's 127.0.0.6 hop and loopback
    clients reach it as v4-mapped sockets, and must pair with their IPv4 client ends. An AF_INET6
    socket bound to ::ffff:<pod IP> shares its origin with an AF_INET socket on the same port
    (one key for both families): Envoy's v6 upstream and the app's v4 connection."""
    m = make_mesh(dataplane, lab, app_host="::")
    port = BOUND_BASE + 300
    upstream = m.conn(
        uid=PROXY_UID,
        family=6,
        bind=(f"::ffff:{POD_IP}", port),
        dest=(f"::ffff:{UPSTREAM_IP}", 7000),
        server="q-first",
        greet=64,
        pre_send_ms=0,
        req=19,
        resp=64,
        shared=True,
        what="Envoy AF_INET6 upstream from ::ffff:pod IP -> server-first",
    )
    app = m.conn(
        uid=APP_UID,
        bind=(POD_IP, port),
        dest=(m.svc, 8080),
        server="app",
        start_ms=200,
        legs=3,
        shared=True,
        what="app AF_INET, same origin -> Service (dual-stack app server)",
    )
    plain = [
        *controls(m, 2),
        *(
            m.conn(
                uid=APP_UID,
                dest=(POD_IP, APP_PORT),
                server="app",
                req=256 * KIB,
                resp=256 * KIB,
                legs=1,
                what="app AF_INET -> own pod IP, [::] listener (unambiguous)",
            )
            for _ in range(2)
        ),
    ]
    m.check([[upstream, app, *plain]])
    wait_drained(m.plane)


@pytest.mark.timeout(120)
def test_ipv6_both_ends(dataplane: Plane, lab: Lab) -> None:
    """AF_INET6 on both ends: the app to the IPv6 Service (ip6tables REDIRECT to [::1]:15001),
    Envoy to [pod]:8080 captured on 15006, Envoy from ::6 to the app; loopback ::1. And the
    collision in IPv6: Envoy's v6 upstream and the app's v6 connection on one [pod IPv6]:port."""
    m = make_mesh(dataplane, lab, ipv6=True, app_host="::")
    svc6 = m.pod.service_ipv6
    port = BOUND_BASE + 400
    pair = [
        m.conn(
            uid=PROXY_UID,
            family=6,
            bind=(POD_IP6, port),
            dest=(UPSTREAM_IP6, 7000),
            server="q-first",
            greet=64,
            pre_send_ms=0,
            req=19,
            resp=64,
            shared=True,
            what="Envoy IPv6 upstream -> server-first [upstream]:7000",
        ),
        m.conn(
            uid=APP_UID,
            family=6,
            bind=(POD_IP6, port),
            dest=(svc6, 8080),
            server="app",
            start_ms=200,
            legs=3,
            shared=True,
            what="app IPv6, same origin -> [Service]:8080",
        ),
    ]
    plain = [
        m.conn(
            uid=APP_UID,
            family=6,
            dest=(svc6, 8081),
            server="app",
            req=256 * KIB,
            resp=256 * KIB,
            legs=3,
            what="app IPv6 -> [Service]:8081 (unambiguous)",
        ),
        m.conn(
            uid=PROXY_UID,
            family=6,
            dest=(POD_IP6, APP_PORT),
            server="app",
            req=256 * KIB,
            resp=256 * KIB,
            legs=2,
            what="Envoy IPv6 inbound-to-self (unambiguous)",
        ),
        m.conn(
            uid=APP_UID,
            family=6,
            dest=("::1", 9000),
            server="lo",
            req=256 * KIB,
            resp=256 * KIB,
            legs=1,
            what="app -> [::1]:9000 (unambiguous)",
        ),
    ]
    m.check([pair + plain])
    wait_drained(m.plane)


# -- property: generated connection sets ---------------------------------------------------------

# (role, destination) pairs a pod really makes; each with where it goes, which server answers,
# whether it speaks first, and how many hops can be accelerated. Envoy never dials the Service
# address (it would leave uncaptured to an address nobody owns), so those pairs are absent.
ROUTES: dict[str, tuple[int, str, int, str, int, int]] = {
    # name: (uid, host ("svc", "pod", "up", "lo"), port, server, greet, legs)
    "app->svc:8080": (APP_UID, "svc", 8080, "app", 0, 3),
    "app->svc:8081": (APP_UID, "svc", 8081, "app", 0, 3),
    "app->upstream:7001 (via Envoy passthrough)": (APP_UID, "up", 7001, "q", 0, 1),
    "app->own IP:8080 (direct)": (APP_UID, "pod", 8080, "app", 0, 1),
    "app->127.0.0.1:9000": (APP_UID, "lo", 9000, "lo", 0, 1),
    "app->127.0.0.1:9001 (server-first)": (APP_UID, "lo", 9001, "lo-first", 64, 1),
    "envoy->upstream:7000 (server-first)": (PROXY_UID, "up", 7000, "q-first", 64, 0),
    "envoy->upstream:7001": (PROXY_UID, "up", 7001, "q", 0, 0),
    "envoy->own IP:8080 (inbound-to-self, 15006)": (PROXY_UID, "pod", 8080, "app", 0, 2),
}

# Weighted towards what makes a collision matter: most sockets on shared port 0, and twice the
# routes whose client stays undecided (Envoy's upstreams, which wait for a greeting or send late)
# and the routes accepted on a capture port (15001, 15006), where a server end looks for its client.
WEIGHTED = [
    "envoy->upstream:7000 (server-first)",
    "envoy->upstream:7001",
    "app->svc:8080",
    "app->svc:8081",
    "envoy->own IP:8080 (inbound-to-self, 15006)",
]
conn_spec = st.fixed_dictionaries(
    {
        "route": st.sampled_from(sorted(ROUTES) + WEIGHTED),
        "slot": st.sampled_from([0, 0, 0, 1, None]),  # shared source port 0 or 1, or kernel-chosen
        "start_ms": st.sampled_from([0, 100, 250]),
        "pre_send_ms": st.sampled_from([0, 20, 400]),
        "size": st.sampled_from([1, 1000, 65536]),
    }
)
ISSUE_EXAMPLE = [
    {"route": "envoy->upstream:7000 (server-first)", "slot": 0, "start_ms": 0, "pre_send_ms": 0, "size": 19},
    {"route": "app->svc:8080", "slot": 0, "start_ms": 250, "pre_send_ms": 20, "size": 1000},
]


def build(m: Mesh, specs: list[dict[str, Any]], base: int) -> list[Conn]:
    """Connections from generated specs. Two sockets can share a source port only towards
    different destinations (a 4-tuple is unique), so a repeated (port, destination) is dropped."""
    hosts = {"svc": m.svc, "pod": POD_IP, "up": UPSTREAM_IP, "lo": "127.0.0.1"}
    conns: list[Conn] = []
    taken: set[tuple[Any, ...]] = set()
    for s in specs:
        uid, host, port, server, greet, legs = ROUTES[s["route"]]
        bind = None
        if s["slot"] is not None:
            bind = ("127.0.0.1" if host == "lo" else POD_IP, base + s["slot"])
            if (bind, host, port) in taken:
                continue
            taken.add((bind, host, port))
        conns.append(
            m.conn(
                uid=uid,
                bind=bind,
                dest=(hosts[host], port),
                server=server,
                greet=greet,
                start_ms=s["start_ms"],
                pre_send_ms=s["pre_send_ms"],
                req=s["size"],
                resp=s["size"],
                timeout=5.0,
                legs=legs,
                what=f"{s['route']} from {bind or 'a kernel-chosen port'} at +{s['start_ms']} ms",
            )
        )
    origins = Counter(c.bind for c in conns if c.bind)
    for c in conns:
        c.shared = c.bind is not None and origins[c.bind] > 1
    return conns


@pytest.mark.timeout(180)
def test_generated_connection_sets(mesh: Mesh) -> None:
    """hypothesis generates sets of 2-8 connections of one pod (the app's and Envoy's, to the
    Service, to another pod, to the pod's own IP, on loopback; server-first or not) whose source
    ports collide on two shared ports, started at different times. Each set: every byte at its
    own peer. Over the run: the unambiguous connections accelerated. One data plane and one
    pair of pods for all sets; each set gets fresh ports (no TIME_WAIT reuse)."""
    m = mesh
    totals = {"want": 0, "redirected": 0, "sets": 0}
    bases = iter(range(BOUND_BASE + 2000, BOUND_BASE + 4000, 2))

    @settings(
        max_examples=20,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: each set takes seconds
        suppress_health_check=[HealthCheck.too_slow],
    )
    @example(ISSUE_EXAMPLE)
    @given(st.lists(conn_spec, min_size=2, max_size=8))
    def one_set(specs: list[dict[str, Any]]) -> None:
        conns = build(m, specs, next(bases))
        before, since = redirected(m.plane, m.cookie), time.monotonic()
        _, results = m.run([conns], timeout=60)
        assert_every_byte_at_its_peer(conns, results, m.servers, since)
        totals["want"] += unambiguous_bytes(conns)
        totals["redirected"] += redirected(m.plane, m.cookie) - before
        totals["sets"] += 1

    one_set()
    m.assert_no_stray_records()
    assert totals["want"] > 0, totals
    assert totals["redirected"] >= ACCELERATED_SHARE * totals["want"], totals
    wait_drained(m.plane)
