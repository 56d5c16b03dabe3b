"""Pod UID -> netns by scanning /proc/*/cgroup (sockops/podresolve.py).

Two layers: a fake /proc tree (any machine, exact control over cgroup paths, host-netns processes
and processes that vanished half way), and real processes in pod-named cgroup v2 children of the
test cgroup, each in a fresh network namespace made with ``unshare -n`` (root only).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.cgroups import Cgroup, preexec_join
from sockops.podresolve import find_pod_netns, index_pods

# -- fake /proc ----------------------------------------------------------------------------------


class FakeProc:
    """``proc/<pid>/cgroup`` and ``proc/<pid>/ns/net``; a host process's ns/net is a hard link
    of ``proc/self/ns/net`` (same inode), any other a file of its own (another namespace)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "self" / "ns").mkdir(parents=True)
        (root / "self" / "ns" / "net").write_text("host")
        self.next_pid = 100

    def add(self, cgroup_lines: list[str], host: bool = False, netns: bool = True) -> Path:
        pid = self.root / str(self.next_pid)
        self.next_pid += 1
        (pid / "ns").mkdir(parents=True)
        (pid / "cgroup").write_text("".join(f"{line}\n" for line in cgroup_lines))
        if host:
            os.link(self.root / "self" / "ns" / "net", pid / "ns" / "net")
        elif netns:
            (pid / "ns" / "net").write_text(pid.name)
        return pid / "ns" / "net"


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def _uid() -> str:
    return str(uuid.uuid4())


def test_cgroupfs_and_systemd_spellings(proc: FakeProc) -> None:
    a, b, c = _uid(), _uid(), _uid()
    proc.add(["0::/init.scope"])
    na = proc.add([f"0::/kubepods/burstable/pod{a}/0123abcd"])
    b_slice = f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{b.replace('-', '_')}.slice"
    nb = proc.add([f"12:memory:/{b_slice}/cri-containerd-ff.scope", f"0::/{b_slice}"])  # hybrid v1 + v2
    nc = proc.add([f"0::/../../kubepods-pod{c.replace('-', '_')}.slice/crio-1.scope"])  # own cgroupns
    assert index_pods([a, b, c], proc=proc.root) == {a: na, b: nb, c: nc}
    assert find_pod_netns(b, proc=proc.root) == nb


def test_host_netns_vanished_and_unknown_are_skipped(proc: FakeProc) -> None:
    hostnet, mixed, gone, absent = _uid(), _uid(), _uid(), _uid()
    proc.add([f"0::/kubepods/pod{hostnet}/c1"], host=True)  # a hostNetwork pod
    proc.add([f"0::/kubepods/pod{mixed}/c1"], host=True)
    nm = proc.add([f"0::/kubepods/pod{mixed}/c2"])  # another process of it is in the pod's netns
    proc.add([f"0::/kubepods/pod{gone}/c1"], netns=False)  # exited between the two reads
    assert index_pods([hostnet, mixed, gone, absent], proc=proc.root) == {mixed: nm}
    assert find_pod_netns(hostnet, proc=proc.root) is None
    assert index_pods([], proc=proc.root) == {}


# -- real processes in pod-named cgroups ---------------------------------------------------------

pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: cgroups and unshare -n")


Spawn = Callable[[str, list[str]], "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn(cgroup: Cgroup) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(child: str, argv: list[str]) -> subprocess.Popen[bytes]:
        path = cgroup.path / child
        path.mkdir(exist_ok=True)
        p = subprocess.Popen(argv, preexec_fn=preexec_join(path))
        procs.append(p)
        return p

    yield start
    cgroup.kill()  # everything inside, before the fixture removes the directories
    for p in procs:
        p.wait(5)


def _index_when(uids: list[str], n: int, timeout: float = 5.0) -> dict[str, Path]:
    """The index once it has ``n`` pods (``unshare`` needs a moment to enter its namespace)."""
    deadline = time.monotonic() + timeout
    while True:
        found = index_pods(uids)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@pytestmark_root
def test_real_pods_in_their_own_netns(spawn: Spawn) -> None:
    systemd, cgroupfs, hostnet = _uid(), _uid(), _uid()
    slice_name = f"kubepods-besteffort-pod{systemd.replace('-', '_')}.slice"
    p1 = spawn(slice_name, ["unshare", "-n", "sleep", "60"])
    p2 = spawn(f"pod{cgroupfs}", ["unshare", "-n", "sleep", "60"])
    spawn(f"pod{hostnet}", ["sleep", "60"])  # a hostNetwork pod: its netns is the node's

    found = _index_when([systemd, cgroupfs, hostnet], 2)
    assert set(found) == {systemd, cgroupfs}, found
    host = os.stat("/proc/self/ns/net").st_ino
    for uid, p in ((systemd, p1), (cgroupfs, p2)):
        assert found[uid] == Path(f"/proc/{p.pid}/ns/net")
        assert os.stat(found[uid]).st_ino != host
    assert find_pod_netns(hostnet) is None
    assert find_pod_netns(cgroupfs.upper()) == found[cgroupfs], "UIDs match in any case"


@pytestmark_root
def test_exited_process_is_not_an_error(spawn: Spawn) -> None:
    uid = _uid()
    p = spawn(f"pod{uid}", ["true"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # exited, not reaped: a zombie while we scan
        with open(f"/proc/{p.pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                break
        time.sleep(0.01)
    assert find_pod_netns(uid) is None
