"""The pod lab itself: real network namespaces, real Istio iptables rules, real Envoy, no BPF.

These tests pin down the test bed that every acceleration test relies on: if the three legs of the
sidecar path (app -> Envoy outbound -> Envoy inbound -> app) are not what Istio does, a passing
sockmap test would prove nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PREFIX

from lab.cgroups import Cgroup
from lab.podlab import APP_UID, NETNS_DIR, Lab, Pod, envoy_binary

APP_PORT = 8080
PAYLOAD = 1 << 20  # 1 MiB

# An echo server that first sends a tag line (to tell two labs apart) and logs every peer as JSON.
# Dual-stack socket so one server covers IPv4 and IPv6; stdlib only, because it runs as UID 1000.
ECHO_SERVER = r"""
import json, socket, sys, threading
port, tag = int(sys.argv[1]), sys.argv[2].encode()
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::", port))
srv.listen(64)
print(json.dumps({"listening": port}), flush=True)

def serve(conn, peer):
    print(json.dumps({"peer": peer[0], "local": conn.getsockname()[0]}), flush=True)
    conn.sendall(tag + b"\n")
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.close()

while True:
    c, a = srv.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""

# Plain blocking sockets on purpose (settimeout() would hide spurious EAGAIN, docs/DATAPLANE.md F13);
# Pod.run's timeout bounds a hang. Sends and receives concurrently so 1 MiB cannot deadlock.
ECHO_CLIENT = r"""
import hashlib, json, os, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = os.urandom(size)
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
sock.connect((host, port))
local, peer = list(sock.getsockname()[:2]), list(sock.getpeername()[:2])

def send():
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)

sender = threading.Thread(target=send)
sender.start()
buf = b""
while b"\n" not in buf:
    chunk = sock.recv(4096)
    if not chunk:
        break
    buf += chunk
tag, _, rest = buf.partition(b"\n")
digest, n = hashlib.sha256(rest), len(rest)
while True:
    chunk = sock.recv(65536)
    if not chunk:
        break
    digest.update(chunk)
    n += len(chunk)
sender.join()
print(json.dumps({
    "tag": tag.decode(), "sent": hashlib.sha256(payload).hexdigest(), "received": digest.hexdigest(),
    "n": n, "local": local, "peer": peer,
}))
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, cgroups)"
    for tool in ("iptables-restore", "ip6tables-restore"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    try:
        envoy_binary()
    except Exception as exc:
        return str(exc)
    return None


pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def _netns_names() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def _ip_netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _unmap(addr: str) -> str:
    """``::ffff:127.0.0.6`` -> ``127.0.0.6`` (the dual-stack server reports v4 peers mapped)."""
    ip = ipaddress.ip_address(addr.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _readline(proc: subprocess.Popen[Any], timeout: float = 10.0) -> dict[str, Any]:
    """One JSON line from a child's stdout, bounded in time (a hung server must fail, not block)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no output from pid {proc.pid} in {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise EOFError(f"pid {proc.pid} exited ({proc.poll()}) without output")
    return json.loads(line)


def start_echo_server(pod: Pod, tag: str = "echo", port: int = APP_PORT) -> subprocess.Popen[Any]:
    proc = pod.popen(
        [sys.executable, "-c", ECHO_SERVER, str(port), tag],
        uid=APP_UID,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert _readline(proc) == {"listening": port}
    return proc


def echo(pod: Pod, host: str, port: int = APP_PORT, size: int = PAYLOAD) -> dict[str, Any]:
    res = pod.run(
        [sys.executable, "-c", ECHO_CLIENT, host, str(port), str(size)], uid=APP_UID, timeout=20.0, text=True
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def assert_echoed(result: dict[str, Any], tag: str = "echo", size: int = PAYLOAD) -> None:
    assert result["tag"] == tag
    assert result["n"] == size
    assert result["received"] == result["sent"]


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    with Cgroup(f"{TEST_PREFIX}-") as cg:
        yield cg


@pytest.fixture
def lab(cgroup: Cgroup) -> Iterator[Lab]:
    with Lab(cgroup, prefix=TEST_PREFIX) as lab:
        yield lab


def test_sidecar_three_legs(lab: Lab, cgroup: Cgroup) -> None:
    pod = lab.add_pod("app", ip="10.244.1.10")
    assert pod.envoy is not None and pod.envoy.poll() is None
    server = start_echo_server(pod)

    result = echo(pod, pod.service_ip)

    assert_echoed(result)
    # Leg 1 as the app sees it: it talks to the service address; REDIRECT is invisible to it.
    assert result["peer"] == [pod.service_ip, APP_PORT]
    assert result["local"][0] == pod.ip
    # Leg 3: the server's peer is Envoy's inbound passthrough source, not the client.
    conn = _readline(server)
    assert _unmap(conn["peer"]) == "127.0.0.6"
    assert _unmap(conn["local"]) == pod.ip
    # Legs 1-2 inside Envoy: both capture listeners accepted, the service cluster and the inbound
    # passthrough each opened an upstream connection, and nothing fell through to the passthrough.
    stats = pod.envoy_stats("(downstream_cx_total|upstream_cx_total)")
    assert stats["listener.0.0.0.0_15001.downstream_cx_total"] == 1
    assert stats["listener.0.0.0.0_15006.downstream_cx_total"] == 1
    assert stats["cluster.outbound|8080||svc.lab.upstream_cx_total"] == 1
    assert stats["cluster.InboundPassthroughCluster.upstream_cx_total"] == 1
    assert stats["cluster.PassthroughCluster.upstream_cx_total"] == 0
    # Envoy runs as 1337 in the test cgroup; the app too.
    for pid in (pod.envoy.pid, server.pid):
        assert pid in cgroup.pids()
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == pod.netns_inode()
    assert os.stat(f"/proc/{pod.envoy.pid}").st_uid == 1337
    assert os.stat(f"/proc/{server.pid}").st_uid == APP_UID


def test_sidecar_dual_stack_and_http(lab: Lab) -> None:
    tcp = lab.add_pod("tcp", ip="10.244.1.10", ipv6="fd00:10:244::10")
    server = start_echo_server(tcp)
    result = echo(tcp, tcp.service_ipv6, size=64 * 1024)
    assert_echoed(result, size=64 * 1024)
    assert _readline(server)["peer"] == "::6"

    web = lab.add_pod("web", ip="10.244.1.11", protocol="http")
    web.popen(
        [sys.executable, "-m", "http.server", str(APP_PORT), "--bind", "0.0.0.0"],
        uid=APP_UID,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    get = (
        "import sys, time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        print(urllib.request.urlopen(sys.argv[1], timeout=5).status); break\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
    )
    res = web.run([sys.executable, "-c", get, f"http://{web.service_ip}:{APP_PORT}/"], uid=APP_UID, text=True)
    assert res.stdout.split()[-1:] == ["200"], res
    stats = web.envoy_stats("downstream_rq_total")
    assert stats["http.outbound_8080__svc.lab.downstream_rq_total"] >= 1
    assert stats["http.InboundPassthroughCluster.downstream_rq_total"] >= 1


def test_without_sidecar_apps_talk_directly(lab: Lab) -> None:
    server_pod = lab.add_pod("server", ip="10.244.1.10", sidecar=False)
    client_pod = lab.add_pod("client", ip="10.244.1.20", sidecar=False)
    assert server_pod.envoy is None
    nat = server_pod.run(["iptables-save", "-t", "nat"], text=True).stdout
    assert "ISTIO" not in nat
    server = start_echo_server(server_pod)

    result = echo(client_pod, server_pod.ip)

    assert_echoed(result)
    assert result["peer"] == [server_pod.ip, APP_PORT]
    assert _unmap(_readline(server)["peer"]) == client_pod.ip


def test_two_labs_with_identical_ips(cgroup: Cgroup) -> None:
    with Lab(cgroup, prefix=TEST_PREFIX) as lab_a, Lab(cgroup, prefix=TEST_PREFIX) as lab_b:
        pod_a = lab_a.add_pod("app", ip="10.244.1.10")
        pod_b = lab_b.add_pod("app", ip="10.244.1.10")
        assert pod_a.netns != pod_b.netns
        assert pod_a.netns_inode() != pod_b.netns_inode()
        server_a = start_echo_server(pod_a, tag="lab-a")
        server_b = start_echo_server(pod_b, tag="lab-b")
        # Both at once: start the clients together, then collect.
        argv = [sys.executable, "-c", ECHO_CLIENT, pod_a.service_ip, str(APP_PORT), str(PAYLOAD)]
        clients = {
            tag: pod.popen(argv, uid=APP_UID, stdout=subprocess.PIPE, text=True)
            for tag, pod in (("lab-a", pod_a), ("lab-b", pod_b))
        }
        for tag, proc in clients.items():
            out, _ = proc.communicate(timeout=20)
            assert proc.returncode == 0
            assert_echoed(json.loads(out), tag=tag)
        for server in (server_a, server_b):
            assert _unmap(_readline(server)["peer"]) == "127.0.0.6"


@pytest.mark.parametrize(
    ("failure", "own_cgroup"),
    [(False, True), (True, False)],
    ids=["clean-exit-own-cgroup", "exception-shared-cgroup"],
)
def test_lab_exit_leaves_nothing(failure: bool, own_cgroup: bool) -> None:
    before = _ip_netns_list()
    with contextlib.ExitStack() as stack:
        shared = None if own_cgroup else stack.enter_context(Cgroup(f"{TEST_PREFIX}-"))
        lab = Lab(shared, prefix=TEST_PREFIX)
        with pytest.raises(RuntimeError, match="boom") if failure else contextlib.nullcontext(), lab:
            pod = lab.add_pod("app", ip="10.244.1.10")
            server = start_echo_server(pod)
            assert_echoed(echo(pod, pod.service_ip, size=4096), size=4096)
            # A grandchild that leaves its parent's session and process group: only the cgroup and
            # the netns still tie it to the lab.
            res = pod.run(
                [
                    sys.executable,
                    "-c",
                    "import subprocess as s; print(s.Popen(['sleep', '300'], start_new_session=True,"
                    " stdout=s.DEVNULL, stderr=s.DEVNULL).pid)",
                ],
                uid=APP_UID,
                text=True,
            )
            assert pod.envoy is not None
            pids = [pod.envoy.pid, server.pid, int(res.stdout)]
            names = {lab.node_netns, pod.netns}
            assert names <= _ip_netns_list()
            assert lab.cgroup is not None and set(pids) <= set(lab.cgroup.pids())
            cgroup_path: Path = lab.cgroup.path
            assert pod.bootstrap_path is not None
            tmpdir = pod.bootstrap_path.parent.parent
            if failure:
                raise RuntimeError("boom")

        # The Lab is gone (the shared cgroup, if any, is still open).
        after = _ip_netns_list()
        assert not names & after
        assert not {n for n in after - before if lab.id in n}
        assert not any((NETNS_DIR / n).exists() for n in names)
        assert not tmpdir.exists()
        deadline = time.monotonic() + 5
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        assert not alive
        if shared is not None:
            assert shared.pids(recursive=True) == []
        else:
            assert not cgroup_path.exists()
    assert not cgroup_path.exists()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
