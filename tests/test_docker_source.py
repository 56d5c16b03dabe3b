"""DockerSource against a real docker engine (tests/support/dockerd.py starts one when none runs).

Containers use a local busybox image and ``--network none`` (a loopback-only namespace of their
own), so nothing here needs an image registry or touches the host's network. The last test runs a
TCP echo pair inside a labelled container with the data plane attached to the test cgroup (the
container sits below it through ``--cgroup-parent``) and checks that its bytes were redirected.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dockerd import Containers, DockerEngine
from support.recording_sink import RecordingSink

from sockops.sources.docker import DockerSource
from sockops.sources.objects import container_to_workload
from sockops.workload import DOCKER_LABEL

LABEL_ON = f"{DOCKER_LABEL}=true"
WAIT = 20.0


class Running:
    """A DockerSource running in a thread with its RecordingSink."""

    def __init__(self, source: DockerSource) -> None:
        self.source = source
        self.sink = RecordingSink(timeout=WAIT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=source.run, args=(self.sink, self.stop), daemon=True)
        self.thread.start()

    def halt(self) -> float:
        """Stop the source; returns how long ``run()`` took to return."""
        t0 = time.monotonic()
        self.stop.set()
        self.thread.join(timeout=10)
        took = time.monotonic() - t0
        assert not self.thread.is_alive(), "DockerSource.run did not return after stop"
        return took


@pytest.fixture
def start_source(docker_engine: DockerEngine) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(base_url: str | None = None, **kw: Any) -> Running:
        r = Running(DockerSource(base_url or docker_engine.host, **kw))
        started.append(r)
        return r

    try:
        yield start
    finally:
        for r in started:
            r.stop.set()
        for r in started:
            r.thread.join(timeout=10)


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# -- tests ----------------------------------------------------------------------------------------


def test_preexisting_containers_are_listed(
    containers: Containers, start_source: Callable[..., Running]
) -> None:
    on = containers.run(labels=(LABEL_ON,))
    plain = containers.run()
    wrong = containers.run(labels=(f"{DOCKER_LABEL}=yes",))
    off = containers.run(labels=(f"{DOCKER_LABEL}=false", "com.docker.compose.project=shop"))
    r = start_source()
    r.sink.wait_for(lambda s: s.count("replace") >= 1, "the first list")
    first = {w.uid: w for w in r.sink.messages("replace")[0]}
    assert {on, plain, wrong, off} <= set(first)
    assert first[on].accelerate and first[on].reason == f"container label {DOCKER_LABEL}=true"
    assert not first[plain].accelerate and first[plain].reason == "not opted in"
    assert not first[wrong].accelerate and first[wrong].errors and '"true"' in first[wrong].errors[0]
    assert not first[off].accelerate and first[off].namespace == "shop"
    assert first[on].namespace == "docker"
    assert first[on].name == containers.inspect(on)["Name"].lstrip("/")
    assert first[on].locator.pid == containers.inspect(on)["State"]["Pid"]


def test_label_opt_in_events_and_netns(containers: Containers, start_source: Callable[..., Running]) -> None:
    r = start_source()
    r.sink.wait_for(lambda s: s.count("replace") >= 1, "the first list")
    on = containers.run(labels=(LABEL_ON,))
    plain = containers.run()
    w = r.sink.wait_workload(on)
    assert w.accelerate and w.source == "docker" and w.uid == on
    info = containers.inspect(on)
    assert w.locator.pid == info["State"]["Pid"]
    # The PID's namespace is the container's own (docker's sandbox), not the host's.
    sandbox = info["NetworkSettings"]["SandboxKey"]
    assert netns_inode(w.locator.pid) == os.stat(sandbox).st_ino
    assert netns_inode(w.locator.pid) != os.stat("/proc/self/ns/net").st_ino
    assert not r.sink.wait_workload(plain).accelerate

    # die -> gone; start again -> back with its new PID; destroy -> gone.
    containers.engine.cli("kill", on)
    r.sink.wait_gone(on)
    containers.engine.cli("start", on)
    w2 = r.sink.wait_workload(on, lambda w: w.locator.pid != info["State"]["Pid"])
    assert w2.accelerate and w2.locator.pid == containers.inspect(on)["State"]["Pid"]
    containers.engine.cli("rm", "-f", plain)
    r.sink.wait_gone(plain)
    assert not r.sink.messages("error")


def test_host_and_shared_network_never_accelerated(
    containers: Containers, start_source: Callable[..., Running]
) -> None:
    r = start_source()
    r.sink.wait_for(lambda s: s.count("replace") >= 1, "the first list")
    owner = containers.run(labels=(LABEL_ON,))
    host = containers.run(labels=(LABEL_ON,), network="host")
    shared = containers.run(labels=(LABEL_ON,), network=f"container:{owner}")
    assert r.sink.wait_workload(owner).accelerate
    wh = r.sink.wait_workload(host)
    assert not wh.accelerate and "host's network namespace" in wh.reason
    ws = r.sink.wait_workload(shared)
    assert not ws.accelerate and owner[:12] in ws.reason


def test_unknown_container_in_event_is_reported(docker_engine: DockerEngine) -> None:
    sink = RecordingSink(timeout=WAIT)
    api = docker_engine.api()
    try:
        cid = secrets.token_hex(32)
        DockerSource(docker_engine.host).handle_event(
            api, {"Type": "container", "Action": "start", "id": cid, "Actor": {"ID": cid}}, sink
        )
    finally:
        api.close()
    (msg,) = sink.messages("error")
    assert cid[:12] in msg and "no longer exists" in msg
    assert not sink.view and sink.count("upsert") == 0


def test_container_to_workload_skips_stopped() -> None:
    info = {"Id": "a" * 64, "Name": "/x", "State": {"Running": False, "Pid": 0}, "Config": {"Labels": {}}}
    assert container_to_workload(info) is None


def test_stop_is_prompt(start_source: Callable[..., Running], tmp_path: Path) -> None:
    # Following a live event stream: the blocking read is interrupted.
    r = start_source()
    r.sink.wait_for(lambda s: s.count("replace") >= 1, "the first list")
    assert r.halt() < 2.0
    # Backing off from an engine that is not there: the wait is interrupted.
    down = start_source(f"unix://{tmp_path / 'no-docker.sock'}", backoff_base=60.0)
    down.sink.wait_for(lambda s: s.count("error") >= 1, "the connection error")
    assert "cannot connect" in down.sink.messages("error")[0]
    assert down.halt() < 2.0
    assert down.sink.count("replace") == 0


def test_daemon_restart_reconnects_and_relists(
    docker_engine: DockerEngine, containers: Containers, start_source: Callable[..., Running]
) -> None:
    if not docker_engine.owned:
        pytest.skip("the docker engine is the machine's own: the tests never restart it")
    plain = containers.run(labels=(LABEL_ON,))
    always = containers.run("--restart=always", labels=(LABEL_ON,))
    r = start_source(backoff_base=0.2, backoff_cap=2.0)
    r.sink.wait_for(lambda s: {plain, always} <= set(s.view), "both containers listed")
    old_pid = r.sink.view[always].locator.pid

    docker_engine.restart()
    # The restart killed `plain` (no restart policy) while nobody watched: only the re-list can
    # tell. `always` came back with a new PID.
    r.sink.wait_for(lambda s: s.count("restarted") >= 1, "restarted", timeout=60)
    r.sink.wait_for(lambda s: s.count("replace") >= 2, "a re-list")
    w = r.sink.wait_workload(always, lambda w: w.locator.pid != old_pid)
    assert w.accelerate and w.locator.pid == containers.inspect(always)["State"]["Pid"]
    r.sink.wait_gone(plain)
    # And the event stream works again.
    fresh = containers.run(labels=(LABEL_ON,))
    assert r.sink.wait_workload(fresh).accelerate
    assert r.halt() < 2.0


# -- traffic through the data plane ------------------------------------------------------------------

ECHO = (
    "nc -ll -p 7000 -e cat & sleep 0.3; "
    "i=0; while [ $i -lt 20 ]; do "
    "/t/nbclient 127.0.0.1 7000 65536; i=$((i+1)); done; "
    "kill $!"
)


@pytest.mark.kernel
def test_traffic_inside_labelled_container_is_redirected(
    docker_engine: DockerEngine,
    containers: Containers,
    start_source: Callable[..., Running],
    cgroup: Any,
    make_dataplane: Callable[..., Any],
) -> None:
    from sockops import netns

    if docker_engine.cgroup_driver() != "cgroupfs":
        pytest.skip("needs the cgroupfs driver to place the container below the test cgroup")
    plane = make_dataplane()
    r = start_source()
    cid = containers.run(labels=(LABEL_ON,), cgroup_parent=f"/{cgroup.path.name}")
    w = r.sink.wait_workload(cid)
    assert w.accelerate and w.locator.pid
    # The container's processes are below the test cgroup, where the programs are attached.
    assert f"0::/{cgroup.path.name}/" in Path(f"/proc/{w.locator.pid}/cgroup").read_text()

    ns = Path(f"/proc/{w.locator.pid}/ns/net")
    cookie = netns.cookie(ns)
    assert cookie != netns.own_cookie()
    plane.maps.enable(cookie, netns.settings_for(ns))

    res = containers.engine.cli("exec", cid, "sh", "-c", ECHO, timeout=120)
    sizes = [int(x) for x in res.stdout.split()]
    assert sizes == [65536] * 20, f"echo answered {sizes}: {res.stderr}"
    stats = plane.stats(cookie)
    assert stats is not None and stats["redirected_bytes"] >= 20 * 65536, stats
