"""Late insertion (issue 12): connections established before their pod was enabled get accelerated,
with every byte in order, and only where that is safe (docs/DATAPLANE.md, "Late insertion").

What a user would check: a keep-alive connection opened before the opt-in carries its later bytes
through the sockhash (redirected byte counters), the content is exact in both directions across
the switch, and programs the late path must not touch (blocking readers, connections whose peer
is outside the node's enabled pods) keep plain TCP and their bytes.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.cgroups import Cgroup
from lab.podlab import Lab, Pod
from sockops import late, loader
from tests.conftest import TEST_PREFIX, Plane
from tests.support.agentproc import AgentProcess, agents, wait_for
from tests.support.podtraffic import _read_json_line, last_json, popen_piped
from tests.support.reader_proof import prove

LATE_PEER = Path(__file__).resolve().parent / "support" / "late_peer.py"

pytestmark = pytest.mark.timeout(90)


class Held:
    """tests/support/late_peer.py in a pod: connections opened and used before the test acts."""

    def __init__(self, pod: Pod, *args: str) -> None:
        self.proc = popen_piped(pod, [sys.executable, str(LATE_PEER), *args])
        self.pod = pod

    def wait_held(self) -> dict[str, Any]:
        return _read_json_line(self.proc, 30, f"late_peer in {self.pod.name}")

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 60) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"late_peer hung: {err}")
        res = last_json(out)
        assert res is not None, err
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def held() -> Iterator[list[Held]]:
    made: list[Held] = []
    yield made
    for h in made:
        h.close()


def start(held: list[Held], pod: Pod, *args: str) -> Held:
    h = Held(pod, *args)
    held.append(h)
    h.wait_held()
    return h


def assert_exact(res: dict[str, Any]) -> None:
    assert res["error"] == "" and res["mismatches"] == 0 and res["unread"] == 0, res


def test_connection_from_before_the_opt_in_is_accelerated(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter, held: list[Held]
) -> None:
    """Four keep-alive connections carry 10 round trips each before the pod is enabled; after a
    late pass every later byte both ways is redirected, and the stream is exact."""
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    conns, size, rounds = 4, 1000, 10
    h = start(held, pod, "--connections", str(conns), "--size", str(size), "--rounds", str(rounds))
    cookie = dataplane.enable(pod)
    assert dataplane.counters()["redirected_bytes"] == 0

    result = inserter.run({cookie: pod.netns_path})

    assert result.namespaces == 1 and result.failed == ()
    c = dataplane.counters()
    assert c["late_inserted"] == 2 * conns and c["late_switched"] == 2 * conns, c
    assert c["late_pruned"] == 0, c
    h.release()
    assert_exact(h.result())
    after = conns * rounds * 2 * size
    c = dataplane.counters()
    assert c["redirected_bytes"] == after, c
    assert dataplane.stats(cookie)["redirected_bytes"] == after
    assert c["redirect_misses"] == 0, c


def test_a_direction_with_unread_tcp_bytes_switches_only_once_they_are_read(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter, held: list[Held]
) -> None:
    """The client ends leave 64 KiB unread at the server ends when the pod is enabled: the first
    pass switches only the server-to-client direction. The server then reads that backlog (over
    TCP) and a second pass switches the other direction. No byte overtakes another."""
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    conns = 3
    h = start(
        held, pod, "--connections", str(conns), "--rounds", "5", "--holds", "2", "--backlog", str(64 * 1024)
    )
    cookie = dataplane.enable(pod)

    first = inserter.run({cookie: pod.netns_path})
    c = dataplane.counters()
    assert c["late_inserted"] == 2 * conns and c["late_switched"] == conns, c
    assert first.waiting == conns  # the agent comes back within its retry interval

    h.release()
    h.wait_held()
    assert inserter.run({cookie: pod.netns_path}).waiting == 0
    assert dataplane.counters()["late_switched"] == 2 * conns

    h.release()
    assert_exact(h.result())
    assert dataplane.counters()["redirected_bytes"] > 0


def test_switching_while_bytes_are_in_flight_keeps_order(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter, held: list[Held]
) -> None:
    """Passes run every 20 ms while eight connections stream both ways at once: each direction
    switches at whatever moment its receiver has caught up, and every byte arrives in order."""
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    conns = 8
    h = start(held, pod, "--connections", str(conns), "--size", "3000", "--rounds", "3", "--stream", "3")
    cookie = dataplane.enable(pod)
    h.release()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        inserter.run({cookie: pod.netns_path})
        time.sleep(0.02)
    assert_exact(h.result())
    c = dataplane.counters()
    assert c["late_inserted"] == 2 * conns, c
    assert c["late_switched"] > 0 and c["redirected_bytes"] > 0, c


def test_blocking_reader_is_never_inserted_and_its_peer_leaves(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter, held: list[Held]
) -> None:
    """Accepted ends that read blocking (a thread may be asleep in recv(), which would never look at
    a psock queue) stay out; their event-loop clients join in the insert step and leave in the
    settle step, as their peer never joined. Everything stays on TCP, exact."""
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    conns = 4
    h = start(held, pod, "--connections", str(conns), "--blocking-server")
    cookie = dataplane.enable(pod)

    inserter.run({cookie: pod.netns_path})

    c = dataplane.counters()
    assert c["late_inserted"] == conns and c["late_pruned"] == conns and c["late_switched"] == 0, c
    assert dataplane.maps.sockets() == []
    h.release()
    assert_exact(h.result())
    assert dataplane.counters()["redirected_bytes"] == 0


def test_pod_not_enabled_is_left_alone(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter, held: list[Held]
) -> None:
    """A pass over an enabled pod never touches another pod's connections, and a namespace that
    vanished (a pod that just died) is reported, not fatal."""
    enabled = lab.add_pod("on", ip="10.244.1.10", sidecar=False)
    other = lab.add_pod("off", ip="10.244.1.11", sidecar=False)
    h_other = start(held, other, "--connections", "2")
    cookie = dataplane.enable(enabled)

    result = inserter.run({cookie: enabled.netns_path, 1: Path("/run/netns/sockops-test-gone")})

    assert result.namespaces == 1 and len(result.failed) == 1
    assert dataplane.counters()["late_inserted"] == 0
    h_other.release()
    assert_exact(h_other.result())


@pytest.mark.envoy
def test_connections_through_envoy_from_before_the_opt_in(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter, held: list[Held]
) -> None:
    """In a sidecar pod, an app connection to a service is three connections (the three-leg path
    of lab.podlab): app -> Envoy through Istio's REDIRECT to 15001, Envoy -> Envoy through the
    REDIRECT to 15006 (neither has mirrored tuples: named from conntrack), and Envoy -> app from
    127.0.0.6 (mirrored). All were opened and used before the enable; after one pass every
    direction of each is redirected, and the streams are exact."""
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=True)
    conns, size, rounds = 3, 1000, 10
    h = start(
        held, pod, "--connections", str(conns), "--host", "0.0.0.0", "--port", "8080",
        "--connect", f"{pod.service_ip}:8080", "--size", str(size), "--rounds", str(rounds),
    )  # fmt: skip
    cookie = dataplane.enable(pod)

    inserter.run({cookie: pod.netns_path}, dataplane.maps.node_pods())

    c = dataplane.counters()
    assert c["late_inserted"] == 6 * conns and c["late_switched"] == 6 * conns, c
    assert c["late_pruned"] == 0, c
    h.release()
    assert_exact(h.result())
    assert dataplane.counters()["redirected_bytes"] == 3 * conns * rounds * 2 * size


def test_nat_names_place_each_end_in_its_namespace() -> None:
    """What the agent writes from conntrack: the client's view under the client's namespace, the
    server's (after REDIRECT) under the server's, one connection name with two roles; an entry
    whose client is not in an enabled pod of the node names nothing."""
    from sockops import layout

    here, other = 11, 22
    redirect = late.NatConnection(
        ("10.244.1.10", 40000), ("10.96.0.1", 80), ("127.0.0.1", 15001), ("10.244.1.10", 40000)
    )
    inbound = late.NatConnection(
        ("10.244.2.20", 50000), ("10.244.1.10", 8080), ("10.244.1.10", 15006), ("10.244.2.20", 50000)
    )
    outside = late.NatConnection(
        ("10.1.1.1", 50001), ("10.244.1.10", 8080), ("10.244.1.10", 15006), ("10.1.1.1", 50001)
    )
    pods = {"10.244.1.10": here, "10.244.2.20": other}

    names = late.nat_names({here: [redirect, inbound, outside]}, pods)

    seen = [
        (
            t.netns,
            layout.words_to_ip(t.local_ip),
            t.local_port,
            k.netns,
            layout.words_to_ip(k.client_ip),
            k.client_port,
            k.dest_port,
            k.role,
        )
        for t, k in names
    ]
    assert seen == [
        (here, "10.244.1.10", 40000, here, "10.244.1.10", 40000, 80, layout.ROLE_CLIENT),
        (here, "127.0.0.1", 15001, here, "10.244.1.10", 40000, 80, layout.ROLE_SERVER),
        (other, "10.244.2.20", 50000, other, "10.244.2.20", 50000, 8080, layout.ROLE_CLIENT),
        (here, "10.244.1.10", 15006, other, "10.244.2.20", 50000, 8080, layout.ROLE_SERVER),
    ]


@pytest.mark.parametrize("setting", ["on", "off"])
def test_agent_accelerates_connections_that_predate_it(
    cgroup: Cgroup, lab: Lab, tmp_path: Path, held: list[Held], setting: str
) -> None:
    """The agent starts after the pod's keep-alive connections were opened and used: with late
    insertion on (the default) its first enforce lets them join, and the metrics say so; with
    ``--late-insertion off`` they stay on TCP. Both exact."""
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    conns, size, rounds = 4, 1000, 10
    h = start(held, pod, "--connections", str(conns), "--size", str(size), "--rounds", str(rounds))
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-late-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        agent = AgentProcess(
            cgroup.path,
            bpffs,
            tmp_path,
            ["--source", "static", "--netns", pod.netns, "--late-insertion", setting],
        )
        started.append(agent)
        agent.wait_ready()
        switched = 2 * conns if setting == "on" else 0
        wait_for(
            lambda: agent.metric("sockops_late_sockets_total", event="switched") == switched,
            10,
            f"{switched} directions switched",
        )
        h.release()
        assert_exact(h.result())
        with loader.PinnedMaps(bpffs) as maps:
            redirected = maps.counters()["redirected_bytes"]
        assert redirected == (conns * rounds * 2 * size if setting == "on" else 0)
        assert agent.metric("sockops_late_sockets_total", event="inserted") == switched


def test_a_peer_that_closed_since_the_last_pass_is_not_waited_for(
    dataplane: Plane, lab: Lab, inserter: late.LateInserter
) -> None:
    """A late socket whose reader was behind at one pass, and whose peer then read everything and
    closed, must not wait for that peer at the next pass (its record of progress is a closed
    socket's): it leaves the sockhash, and the agent stops coming back for it."""
    from sockops import netns

    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    with netns.entered(pod.netns_path):
        listener = socket.create_server(("127.0.0.1", 0))
        # a first connection on which both ends read: the listening port and this process's
        # client sockets are proven to the reader hook (docs/DATAPLANE.md, "Splice readers")
        prove(listener)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    with listener, client, server:
        server.settimeout(5)
        client.sendall(b"x" * 65536)
        cookie = dataplane.enable(pod)
        assert inserter.run({cookie: pod.netns_path}).waiting == 1

        got = b""
        while len(got) < 65536:
            got += server.recv(65536)
        server.close()  # read everything, then closed: the client is left in CLOSE_WAIT
        assert client.recv(1) == b""

        result = inserter.run({cookie: pod.netns_path})
        assert result.waiting == 0
        c = dataplane.counters()
        assert c["late_pruned"] == 1 and c["late_switched"] == 1, {k: v for k, v in c.items() if v}
        assert dataplane.maps.sockets() == []


def test_nat_names_that_do_not_fit_the_map_stay_unnamed() -> None:
    """A full late_nat map (bcc raises a bare Exception) leaves the rest of the NATed connections
    unnamed, on TCP; the pass itself goes on."""

    class Full(list):  # type: ignore[type-arg]
        def __setitem__(self, key: object, value: object) -> None:
            if len(self) >= 1:
                raise Exception("Could not update table: no space left")
            self.append((key, value))

    conn = late.NatConnection(
        ("10.244.1.10", 40000), ("10.96.0.1", 80), ("127.0.0.1", 15001), ("10.244.1.10", 40000)
    )
    ins = late.LateInserter.__new__(late.LateInserter)  # no iterator link: only the naming
    ins._nat = Full()
    ins._name_nat(late.nat_names({11: [conn]}, {"10.244.1.10": 11}))
    assert len(ins._nat) == 1
