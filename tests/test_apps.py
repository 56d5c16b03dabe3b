"""The app zoo: ordinary programs in an enabled pod, with sockops off and on (issue 12).

Each program runs in a pod without and with the sidecar (real Envoy, the three-leg path of
lab.podlab), first with the pod not enabled, then enabled. A user checks that every request comes
back intact (sha256 of what was sent against what came back), that nothing hangs (every client
run is bounded) and how much of the pod's traffic sockops carried: the share of bytes redirected
is ``redirected / (redirected + bytes that crossed the pod's loopback)`` over a measured run after
a warm-up run (loopback bytes include TCP/IP headers, handshakes and ACKs, so the share is a lower
bound).

Each case appends its figures to $SOCKOPS_ZOO_REPORT (one JSON line) when that is set; the table
in docs/RELIABILITY.md ("App zoo") is made from it.

What each program's I/O style gets (docs/DATAPLANE.md, "Who may be redirected to"): event-loop
programs (Go, nginx, HAProxy, asyncio, redis, curl, Envoy) are accelerated; blocking clients (the
thread-per-connection proxy's upstream, socat's connect, the server-first client) stay on plain
TCP; a splice() reader (Go's io.Copy proxy) is known to the reader hook from the run with the pod
off, and its sockets are never given a psock: intact, on plain TCP (docs/DATAPLANE.md, "Splice
readers"). HAProxy with ``option splice-auto`` reads with recv() first but does splice large
transfers, so it is known as a splicer too and stays on plain TCP.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import BPFFS_ROOT, TEST_PREFIX, Plane, wait_drained
from support.agentproc import AgentProcess, agents, wait_for
from support.podtraffic import APP_UID, last_json

from bench.load import wait_listening
from lab.cgroups import Cgroup
from lab.podlab import Lab, Pod
from sockops import late, netns
from sockops.maps import PinnedMaps

ZOO = Path(__file__).resolve().parent / "support" / "zoo"
PORT = 8080  # what the client connects to (through Envoy: the service address)
BACKEND = 9090  # the proxies' upstream, on the pod's loopback (Istio never captures it)
RUN_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def zoo_bin() -> Iterator[Path]:
    """The Go programs of tests/support/zoo built with Debian's golang-go, in a directory the
    apps' UID can read."""
    go = shutil.which("go")
    if not go:
        pytest.skip("golang-go is needed for the Go programs of the zoo (make setup installs it)")
    d = Path(tempfile.mkdtemp(prefix="sockops-test-zoo-"))
    try:
        d.chmod(0o755)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(d),
            "GOCACHE": str(d / "cache"),
            "GOPATH": str(d / "gopath"),
            "GO111MODULE": "off",
            "CGO_ENABLED": "0",
        }
        for name in ("iocopy", "httpecho"):
            res = subprocess.run(
                [go, "build", "-o", str(d / name), str(ZOO / f"{name}.go")],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if res.returncode != 0:
                pytest.fail(f"go build {name} failed: {res.stderr}")
        shutil.rmtree(d / "cache", ignore_errors=True)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- running things in the pod ---------------------------------------------------------------------


def start(pod: Pod, argv: list[str], port: int, work: Path, uid: int = APP_UID) -> None:
    """Start a long-running program in the pod (the Lab kills it at teardown) and wait until it
    listens on ``port``."""
    log = work / f"{Path(argv[0]).name}-{port}.log"
    with open(log, "wb") as f:
        pod.popen(argv, uid=uid, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_listening(pod, port, timeout=15)
    except Exception as e:
        pytest.fail(f"{argv[0]} did not listen on {port}: {e}\n{log.read_text(errors='replace')[-2000:]}")


def run_json(pod: Pod, argv: list[str], timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Run a checking client in the pod; its JSON line, or {"hung": True} when it ran past the
    bound (a hang is reported, never waited for)."""
    try:
        res = pod.run(argv, uid=APP_UID, timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        return {"hung": True}
    out = last_json(res.stdout)
    if out is None:
        return {"errors": [f"client printed nothing (rc {res.returncode}): {res.stderr[-500:]}"]}
    return out


def intact(res: dict[str, Any], expect_ok: int) -> bool:
    return (
        not res.get("hung")
        and not res.get("errors")
        and res.get("mismatches", 0) == 0
        and res.get("ok", res.get("requests")) == expect_ok
    )


def loopback_bytes(pod: Pod) -> int:
    """Bytes sent on the pod's loopback (netlink, so the pod's own lo, not the host's)."""
    res = pod.run(["ip", "-j", "-s", "link", "show", "lo"], text=True, timeout=10)
    return int(json.loads(res.stdout)[0]["stats64"]["tx"]["bytes"])


# -- the programs --------------------------------------------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    """The case's directory for the programs' logs, configs and temp files, owned by the apps'
    UID (pytest's own tmp directories are private to root); removed at the end."""
    d = Path(tempfile.mkdtemp(prefix="sockops-test-zoo-work-"))
    try:
        os.chown(d, APP_UID, APP_UID)
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class App:
    """One program of the zoo: how to start it in a pod, and its checking client."""

    name: str
    start: Callable[[Pod, Path, Path], None]  # (pod, zoo_bin, work)
    client: Callable[[Pod, str, Path], dict[str, Any]]  # (pod, host, zoo_bin) -> result
    requests: int  # what a clean client run reports as ok
    accelerated: bool = True  # expected to carry >= 90 % of its bytes when on
    pooled: bool = False  # keeps upstream connections open from the run before the enable


def echo_backend(pod: Pod, work: Path) -> None:
    start(
        pod,
        [sys.executable, "-m", "lab.apps", "server", "--host", "127.0.0.1", "--port", str(BACKEND)],
        BACKEND,
        work,
    )


LAB_CLIENT_SIZES = "1,65536,1048576"


def lab_client(pod: Pod, host: str, _bin: Path) -> dict[str, Any]:
    """lab.apps' checking client: event-wait sockets (O_NONBLOCK + poll), 4 connections x 6
    requests, each request's echo compared by sha256."""
    argv = [
        sys.executable, "-m", "lab.apps", "client", "--host", host, "--port", str(PORT),
        "--connections", "4", "--requests", "6", "--sizes", LAB_CLIENT_SIZES, "--timeout", "30",
    ]  # fmt: skip
    return run_json(pod, argv)


def go_http_client(pod: Pod, host: str, zoo_bin: Path) -> dict[str, Any]:
    return run_json(pod, [str(zoo_bin / "httpecho"), "client", f"http://{host}:{PORT}/", "4", "25", "65536"])


def curl_client(pod: Pod, host: str, _bin: Path) -> dict[str, Any]:
    return run_json(
        pod, [sys.executable, str(ZOO / "curl_check.py"), f"http://{host}:{PORT}/", "20", "262144"]
    )


def start_go_http(pod: Pod, zoo_bin: Path, work: Path) -> None:
    start(pod, [str(zoo_bin / "httpecho"), "server", f"0.0.0.0:{PORT}"], PORT, work)


def start_go_iocopy(pod: Pod, zoo_bin: Path, work: Path) -> None:
    echo_backend(pod, work)
    start(pod, [str(zoo_bin / "iocopy"), f"0.0.0.0:{PORT}", f"127.0.0.1:{BACKEND}"], PORT, work)


def start_asyncio(pod: Pod, _bin: Path, work: Path) -> None:
    start(pod, [sys.executable, str(ZOO / "asyncio_echo.py"), "0.0.0.0", str(PORT)], PORT, work)


def start_threaded_proxy(pod: Pod, _bin: Path, work: Path) -> None:
    echo_backend(pod, work)
    start(pod, [sys.executable, str(ZOO / "threaded_proxy.py"), str(PORT), str(BACKEND)], PORT, work)


def start_socat(pod: Pod, _bin: Path, work: Path) -> None:
    echo_backend(pod, work)
    start(pod, ["socat", f"TCP-LISTEN:{PORT},fork,reuseaddr", f"TCP:127.0.0.1:{BACKEND}"], PORT, work)


def start_haproxy(pod: Pod, _bin: Path, work: Path) -> None:
    echo_backend(pod, work)
    conf = work / "haproxy.cfg"
    conf.write_text(
        f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option splice-auto
frontend zoo
    bind 0.0.0.0:{PORT}
    default_backend echo
backend echo
    server echo 127.0.0.1:{BACKEND}
"""
    )
    conf.chmod(0o644)
    start(pod, ["haproxy", "-db", "-f", str(conf)], PORT, work)


def start_nginx(pod: Pod, zoo_bin: Path, work: Path, keepalive: bool = False) -> None:
    """nginx proxy_pass with proxy_buffering off in front of the Go HTTP echo server; with
    ``keepalive``, nginx keeps a pool of upstream connections open between requests, so the
    connections made while the pod was off carry the requests after the enable too."""
    pool = "keepalive 16;" if keepalive else ""
    reuse = 'proxy_set_header Connection "";' if keepalive else ""
    start(pod, [str(zoo_bin / "httpecho"), "server", f"127.0.0.1:{BACKEND}"], BACKEND, work)
    conf = work / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    client_max_body_size 16m;
    upstream echo {{ server 127.0.0.1:{BACKEND}; {pool} }}
    server {{
        listen 0.0.0.0:{PORT};
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_request_buffering off;
            {reuse}
        }}
    }}
}}
"""
    )
    conf.chmod(0o644)
    start(
        pod, ["/usr/sbin/nginx", "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")], PORT, work
    )


def start_nginx_keepalive(pod: Pod, zoo_bin: Path, work: Path) -> None:
    start_nginx(pod, zoo_bin, work, keepalive=True)


def start_redis(pod: Pod, _bin: Path, work: Path) -> None:
    start(
        pod,
        ["redis-server", "--port", str(PORT), "--bind", "0.0.0.0", "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--dir", str(work)],
        PORT,
        work,
    )  # fmt: skip


def redis_client(pod: Pod, host: str, _bin: Path) -> dict[str, Any]:
    """redis-benchmark (SET/GET, 8 clients, 16 KiB values), then a 1 MiB value written and read
    back with redis-cli and compared by sha256."""
    try:
        bench = pod.run(
            ["redis-benchmark", "-h", host, "-p", str(PORT), "-t", "set,get", "-n", "4000", "-c", "8",
             "-d", "16384", "-q"],
            uid=APP_UID, timeout=RUN_TIMEOUT, text=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"hung": True}
    return run_json(pod, [sys.executable, str(ZOO / "redis_check.py"), host, str(PORT), bench.stdout])


def start_server_first(pod: Pod, _bin: Path, work: Path) -> None:
    start(pod, [sys.executable, str(ZOO / "server_first.py"), "server", str(PORT)], PORT, work)


def server_first_client(pod: Pod, host: str, _bin: Path) -> dict[str, Any]:
    return run_json(pod, [sys.executable, str(ZOO / "server_first.py"), "client", host, str(PORT), "100"])


APPS = [
    App("go-net-http", start_go_http, go_http_client, requests=100),
    App("curl", start_go_http, curl_client, requests=20),
    App("nginx-proxy-pass", start_nginx, go_http_client, requests=100),
    App("nginx-upstream-keepalive", start_nginx_keepalive, go_http_client, requests=100, pooled=True),
    App("asyncio", start_asyncio, lab_client, requests=24),
    App("redis", start_redis, redis_client, requests=1),
    App("python-threaded-proxy", start_threaded_proxy, lab_client, requests=24, accelerated=False),
    App("socat", start_socat, lab_client, requests=24, accelerated=False),
    App("server-first-halfclose", start_server_first, server_first_client, requests=100, accelerated=False),
    App("go-io-copy", start_go_iocopy, lab_client, requests=24, accelerated=False),
    # HAProxy's splice-auto does splice (the run with the pod off shows it): plain TCP, like Go's io.Copy
    App("haproxy-splice-auto", start_haproxy, lab_client, requests=24, accelerated=False),
]


def report(line: dict[str, Any]) -> None:
    path = os.environ.get("SOCKOPS_ZOO_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kernel": os.uname().release, **line}) + "\n")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["plain", pytest.param("sidecar", marks=pytest.mark.envoy)])
@pytest.mark.parametrize("app", [pytest.param(a, id=a.name) for a in APPS])
def test_app(
    dataplane: Plane, lab: Lab, work: Path, zoo_bin: Path, inserter: late.LateInserter, app: App, path: str
) -> None:
    """The program is intact with the pod off and on (no lost or changed byte, no error, no hang);
    the event-loop programs have >= 90 % of their bytes redirected after a warm-up. As the agent
    does, a late-insertion pass follows the enable: connections the programs keep open from the
    run before (nginx's upstream pool) join it (docs/DATAPLANE.md, "Late insertion")."""
    sidecar = path == "sidecar"
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=sidecar)
    app.start(pod, zoo_bin, work)
    host = pod.service_ip if sidecar else "127.0.0.1"

    off = app.client(pod, host, zoo_bin)
    assert intact(off, app.requests), ("off", off)

    cookie = dataplane.enable(pod)
    inserter.run({cookie: pod.netns_path})
    warm = app.client(pod, host, zoo_bin)
    before = dataplane.stats(cookie) or {}
    lo_before = loopback_bytes(pod)
    on = app.client(pod, host, zoo_bin)
    after = dataplane.stats(cookie) or {}
    lo = loopback_bytes(pod) - lo_before
    redirected = after.get("redirected_bytes", 0) - before.get("redirected_bytes", 0)
    share = redirected / (redirected + lo) if redirected + lo else 0.0
    c = dataplane.counters()
    line = {
        "app": app.name,
        "path": path,
        "intact_off": intact(off, app.requests),
        "intact_on": intact(warm, app.requests) and intact(on, app.requests),
        "hung": bool(warm.get("hung") or on.get("hung")),
        "errors": (warm.get("errors") or [])[:3] + (on.get("errors") or [])[:3],
        "redirected_share": round(share, 3),
        "skipped_blocking": c.get("skipped_blocking", 0),
        "late_switched": c.get("late_switched", 0),
    }
    report(line)
    assert intact(warm, app.requests), ("on, warm-up", warm, c)
    assert intact(on, app.requests), ("on", on, c)
    if app.accelerated:
        assert share >= 0.9, line
    if app.pooled:
        assert line["late_switched"] > 0, line
    else:
        wait_drained(dataplane)  # a pool stays open, and in the sockhash, until the pod ends


# -- splice readers (bpf/reader.bpf.c) ------------------------------------------------------------


def short_lab_client(pod: Pod, host: str, requests: int = 6, timeout: float = 4.0) -> dict[str, Any]:
    """lab.apps' client with a short bound: a request stuck behind a splice reader fails fast."""
    argv = [
        sys.executable, "-m", "lab.apps", "client", "--host", host, "--port", str(PORT),
        "--connections", "1", "--requests", str(requests), "--sizes", LAB_CLIENT_SIZES,
        "--timeout", str(timeout),
    ]  # fmt: skip
    return run_json(pod, argv, timeout=timeout + 30)


@pytest.mark.timeout(120)
def test_a_program_seen_splicing_is_never_given_a_psock(
    dataplane: Plane, lab: Lab, work: Path, zoo_bin: Path
) -> None:
    """Go's io.Copy proxy splices its sockets. It runs with its pod off first; the reader hook
    sees it splice, and from then on none of its sockets gets a psock: with the pod on, its
    accepted and its upstream connections stay plain TCP and every request is intact (before
    the hook, every request timed out), nothing was stranded where splice() cannot see it (no
    splice_reader anomaly), and its echo backend and an asyncio server in another enabled pod are
    still accelerated. The same proxy in a pod that is not enabled counts nothing."""

    gopod = lab.add_pod("goproxy", ip="10.244.1.10", sidecar=False)
    other = lab.add_pod("asyncio", ip="10.244.1.11", sidecar=False)
    plain = lab.add_pod("plain", ip="10.244.1.12", sidecar=False)
    start_go_iocopy(gopod, zoo_bin, work)
    start_asyncio(other, zoo_bin, work)
    (work / "plain").mkdir()  # its logs apart from the other proxy's
    start_go_iocopy(plain, zoo_bin, work / "plain")
    assert intact(short_lab_client(gopod, "127.0.0.1"), 6)  # off: the hook learns the program
    other.probe(PORT)  # the asyncio server reads a connection with recv(): its port is proven
    cookies = {p.name: dataplane.enable(p) for p in (gopod, other)}

    assert intact(lab_client(gopod, "127.0.0.1", zoo_bin), 24)
    assert intact(short_lab_client(other, "127.0.0.1"), 6)
    assert intact(short_lab_client(plain, "127.0.0.1"), 6)

    c = dataplane.counters()
    assert c["skipped_splicer"] >= 8, c  # 4 accepted + 4 upstream sockets of the proxy
    anomalies = dataplane.maps.anomalies()
    assert anomalies[cookies["goproxy"]].counts["splice_reader"] == 0
    assert (dataplane.stats(cookies["asyncio"]) or {}).get("redirected_bytes", 0) > 0
    assert netns.cookie(plain.netns_path) not in anomalies


@pytest.mark.timeout(120)
def test_the_reader_hook_sees_the_programs_of_an_observed_pod(
    dataplane: Plane, lab: Lab, work: Path, zoo_bin: Path
) -> None:
    """Observe mode (sockops.io/accelerate: "observe"): the pod is watched (an anomaly entry, as the
    agent writes for it) but never enabled, so its traffic is plain TCP and intact, and the hook
    still counts the Go proxy's splice() calls: what observe mode reports as not safe to
    accelerate."""

    pod = lab.add_pod("goproxy", ip="10.244.1.10", sidecar=False)
    start_go_iocopy(pod, zoo_bin, work)
    cookie = netns.cookie(pod.netns_path)
    dataplane.maps.watch(cookie)

    assert intact(lab_client(pod, "127.0.0.1", zoo_bin), 24)

    seen = dataplane.maps.anomalies()[cookie]
    assert seen.counts["splice_reader"] > 0 and seen.last["splice_reader"][1] == "iocopy", seen
    assert dataplane.counters()["redirected_bytes"] == 0
    dataplane.maps.unwatch(cookie)
    assert cookie not in dataplane.maps.anomalies()


@pytest.mark.timeout(120)
def test_a_splice_reader_started_in_an_enabled_pod_loses_nothing(
    dataplane: Plane, lab: Lab, work: Path, zoo_bin: Path
) -> None:
    """Go's io.Copy proxy started in a pod that is already enabled, never seen before (as a
    Kubernetes rollout starts it): its port has not shown how it is read and the proxy serves, so
    neither its accepted nor its upstream sockets get a psock; it splices them, and from then on it
    is a known splicer. Every request is intact from the very first (before, the first
    connection's request was stranded in a psock queue that splice() never reads), and nothing
    was stranded (no splice_reader anomaly)."""
    pod = lab.add_pod("goproxy", ip="10.244.1.10", sidecar=False)
    cookie = dataplane.enable(pod)
    start_go_iocopy(pod, zoo_bin, work)

    first = short_lab_client(pod, "127.0.0.1")
    assert intact(first, 6), ("first connection", first, dataplane.counters())
    assert intact(lab_client(pod, "127.0.0.1", zoo_bin), 24)

    c = dataplane.counters()
    assert c["skipped_unproven"] >= 2, c  # the first connection's accepted and upstream ends
    assert c["skipped_splicer"] >= 8, c  # then the 4 connections of the second run, both ends
    assert dataplane.maps.anomalies()[cookie].counts["splice_reader"] == 0


@pytest.mark.timeout(120)
def test_a_new_server_is_accelerated_from_its_second_connection(
    dataplane: Plane, lab: Lab, work: Path, zoo_bin: Path
) -> None:
    """What the proof costs: an asyncio server started in an enabled pod has its first connection
    on plain TCP (its port has not been read yet: counted as not eligible, unproven_reader); it
    reads that connection with recv(), and its later connections are redirected."""
    pod = lab.add_pod("asyncio", ip="10.244.1.10", sidecar=False)
    cookie = dataplane.enable(pod)
    start_asyncio(pod, zoo_bin, work)

    assert intact(short_lab_client(pod, "127.0.0.1"), 6)
    assert (dataplane.stats(cookie) or {}).get("redirected_bytes", 0) == 0
    assert dataplane.counters()["skipped_unproven"] == 1

    res = lab_client(pod, "127.0.0.1", zoo_bin)
    assert intact(res, 24)
    one_connection = 2 * 2 * sum(int(n) for n in LAB_CLIENT_SIZES.split(","))  # 6 requests, echoed
    assert (dataplane.stats(cookie) or {}).get("redirected_bytes", 0) >= one_connection
    assert dataplane.counters()["skipped_unproven"] == 1


LATE_SPLICER = Path(__file__).resolve().parent / "support" / "late_splicer.py"


def late_splicer_client(pod: Pod, mode: str) -> dict[str, Any]:
    argv = [
        sys.executable, str(LATE_SPLICER), "client", "127.0.0.1", str(PORT),
        "--mode", mode, "--warm-ms", "100",
    ]  # fmt: skip
    return run_json(pod, argv, timeout=30)


@pytest.mark.timeout(180)
def test_the_breaker_keeps_a_pod_on_tcp_once_a_proven_program_splices(
    cgroup: Cgroup, lab: Lab, work: Path, tmp_path: Path
) -> None:
    """The one style the reader hook cannot foresee: a program that has read its port with recv()
    (so the port is proven and its connections get psocks) and later splices one of them, as
    HAProxy's splice-auto decides per transfer. The agent with its defaults (``splice_reader=1``):
    the first connection proves the port on plain TCP; the second is accelerated and its spliced
    bytes are stranded (bounded here at 5 s); the hook names the program, the breaker suspends
    the pod, and every later connection is plain TCP and intact, spliced or not."""
    pod = lab.add_pod("splicer", ip="10.244.1.10", sidecar=False)
    bpffs = BPFFS_ROOT / f"{TEST_PREFIX}-guard-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        agent = AgentProcess(cgroup.path, bpffs, tmp_path, ["--source", "static", "--netns", pod.netns])
        started.append(agent)
        agent.wait_ready()
        # started after the hook: its listen() and its first accept() are seen
        start(pod, [sys.executable, str(LATE_SPLICER), "server", str(PORT)], PORT, work)

        first = late_splicer_client(pod, "recv")
        assert first["intact"], first
        with PinnedMaps(bpffs) as maps:  # the port was not proven yet: plain TCP
            assert maps.netns_stats()[netns.cookie(pod.netns_path)]["redirected_bytes"] == 0
        stranded = late_splicer_client(pod, "splice")  # the gap itself: it times out
        assert not stranded["intact"], stranded

        wait_for(
            lambda: agent.state().get(pod.netns, {}).get("state") == "suspended", 15, "the pod suspended"
        )
        trip = agent.state()[pod.netns]["breaker"]
        assert trip["kind"] == "splice_reader" and trip["comm"] == "late-splicer", trip
        for mode in ("splice", "recv", "splice"):
            after = late_splicer_client(pod, mode)
            assert after["intact"], (mode, after)
