"""Fixtures for the kernel tests: a private cgroup, a loaded and attached data plane, pod labs.

Everything a fixture creates is removed in its teardown, also when the test fails:

* ``cgroup``: a fresh cgroup v2 child ``sockops-test-*`` (never the root: programs are attached
  only to this child, so no socket of the machine outside the test is ever seen);
* ``make_dataplane(sizes=None)`` / ``dataplane``: ``DataPlane.load`` with its own bpffs directory
  ``/sys/fs/bpf/sockops-test-*``, attached to the test cgroup; teardown detaches, closes the maps,
  unpins, and checks that neither the directory nor an attachment is left;
* ``make_lab()`` / ``lab``: podlab Labs whose processes all run in the test cgroup.

Tests marked ``kernel`` are skipped, with the reason, where BPF cannot be loaded (not root, no
bcc, no bpffs, no cgroup v2, no kernel headers); ``envoy`` tests also need the Envoy binary.
At the end of the session, a check fails the run if any test namespace, bpffs directory or cgroup
is left behind, or if a sock_ops program was attached to the cgroup v2 root.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab.cgroups import Cgroup
from lab.podlab import NETNS_DIR, Lab, Pod, envoy_binary
from sockops.cgroups import find_cgroup2_root

# docker_engine, busybox_image, base_image (tests/support/dockerd.py)
pytest_plugins = ["support.dockerd"]

# Every object a test session makes is named with this session's own prefix, so the leftover
# check at the end sees only its own objects, even while another test run shares the machine.
TEST_PREFIX = f"sockops-test-{os.environ.get('SOCKOPS_TEST_SESSION') or secrets.token_hex(2)}"
BPFFS_ROOT = Path("/sys/fs/bpf")


# -- skipping ------------------------------------------------------------------------------------


@functools.cache
def kernel_skip_reason() -> str | None:
    """Why BPF programs cannot be loaded here, or None."""
    if os.geteuid() != 0:
        return "kernel tests need root (BPF, network namespaces, cgroups): run pytest as root"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"bcc is not importable ({e}): apt-get install python3-bpfcc, venv with --system-site-packages"
    from sockops.errors import SockopsError
    from sockops.loader import check_bpffs, check_headers

    try:
        check_bpffs(BPFFS_ROOT)
        check_headers()
        find_cgroup2_root()
    except (SockopsError, RuntimeError) as e:
        return str(e)
    return None


@functools.cache
def envoy_skip_reason() -> str | None:
    try:
        envoy_binary()
    except Exception as e:
        return str(e)
    return None


def pytest_configure(config: pytest.Config) -> None:
    # bcc 0.26 warns about every str it is given (program text, function names).
    config.addinivalue_line("filterwarnings", "ignore:not a bytes object:DeprecationWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kernel") and kernel_skip_reason():
            item.add_marker(pytest.mark.skip(reason=kernel_skip_reason()))
        elif item.get_closest_marker("envoy") and envoy_skip_reason():
            item.add_marker(pytest.mark.skip(reason=envoy_skip_reason()))


# -- leftovers -----------------------------------------------------------------------------------


def _root_sock_ops() -> list[int]:
    from sockops.libbpf import BPF_CGROUP_SOCK_OPS, prog_query

    fd = os.open(find_cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return prog_query(fd, BPF_CGROUP_SOCK_OPS)[0]
    finally:
        os.close(fd)


def leftovers() -> list[str]:
    """Test namespaces, bpffs directories and cgroups that still exist."""
    found: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        found += [f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(TEST_PREFIX)]
    found += [f"bpffs {p}" for p in BPFFS_ROOT.glob(f"{TEST_PREFIX}-*")]
    with contextlib.suppress(RuntimeError):
        found += [f"cgroup {p}" for p in find_cgroup2_root().glob(f"{TEST_PREFIX}-*")]
    return found


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    root_progs = _root_sock_ops() if os.geteuid() == 0 else []
    before = set(leftovers()) if os.geteuid() == 0 else set()
    yield
    if os.geteuid() != 0:
        return
    left = sorted(set(leftovers()) - before)
    assert not left, f"the tests left these behind: {left}"
    assert _root_sock_ops() == root_progs, "a sock_ops program was attached to the cgroup v2 root"


# -- cgroup --------------------------------------------------------------------------------------


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    """A fresh cgroup v2 child of the root; every process inside is killed and it is removed."""
    cg = Cgroup(f"{TEST_PREFIX}-")
    try:
        assert cg.path.parent == cg.root and cg.path != cg.root
        yield cg
    finally:
        cg.close()


# -- data plane ----------------------------------------------------------------------------------


@dataclass
class Plane:
    """A loaded, attached DataPlane and its pinned maps (opened by path, as the CLI does)."""

    dp: Any  # sockops.loader.DataPlane
    maps: Any  # sockops.loader.PinnedMaps
    bpffs_dir: Path
    cgroup: Path
    enabled: dict[str, int] = field(default_factory=dict)

    def enable(self, pod: Pod, **overrides: Any) -> int:
        """Opt the pod's netns in, with the settings read from the pod; returns its cookie."""
        from sockops import netns

        cookie = netns.cookie(pod.netns_path)
        settings = netns.settings_for(pod.netns_path, **overrides)
        self.maps.enable(cookie, settings)
        self.enabled[pod.netns] = cookie
        return cookie

    def counters(self) -> dict[str, int]:
        return self.maps.counters()

    def stats(self, cookie: int) -> dict[str, int] | None:
        """Per-netns counters for one cookie, None if the netns has no entry."""
        return self.maps.netns_stats().get(cookie)


def conn_entries(plane: Plane) -> list[int]:
    """Client cookies with half-close hand-off bits (the conns map, one per paired connection)."""
    import ctypes

    from sockops import layout

    return [k.value for k in plane.maps._keys(layout.MAP_CONNS, ctypes.c_uint64)]


def wait_drained(plane: Plane, timeout: float = 15.0, open_handshakes: bool = False) -> None:
    """Once every connection is closed, no socket, pending, conns or SYN-ACK entry may be left in
    the maps (a leak would fill them under churn). ``open_handshakes``: SYN-ACK records of
    handshakes that never completed may stay (crafted SYNs); they age out of the LRU map."""
    deadline = time.monotonic() + timeout
    while True:
        left = {
            "sockets": len(plane.maps.sockets()),
            "pending": len(plane.maps.pending()),
            "conns": len(conn_entries(plane)),
            "SYN-ACK records": 0 if open_handshakes else len(plane.maps.synacks()),
        }
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"maps not drained after {timeout}s: {left}")
        time.sleep(0.05)


def _teardown_plane(plane: Plane) -> None:
    from sockops.links import FOREIGN
    from sockops.loader import attached_programs, detach_all, unpin

    try:
        detach_all(plane.cgroup, plane.bpffs_dir)
        # Another tool's programs (a test's) are not sockops' to remove: they stay.
        found = attached_programs(plane.cgroup, plane.bpffs_dir).items()
        left = {k: [p for p in v if p["owner"] != FOREIGN] for k, v in found}
        assert not any(left.values()), f"still attached after detach_all: {left}"
    finally:
        with contextlib.suppress(Exception):
            plane.maps.close()
        with contextlib.suppress(Exception):
            plane.dp.bpf.close()  # program and map fds of the bcc module
        unpin(plane.bpffs_dir)
    assert not plane.bpffs_dir.exists(), f"{plane.bpffs_dir} still exists after unpin"


@pytest.fixture
def make_dataplane(cgroup: Cgroup) -> Iterator[Callable[..., Plane]]:
    """Factory: ``make_dataplane(sizes=MapSizes(...))`` loads, pins under a fresh bpffs directory
    and attaches to the test cgroup through its own links. A second call attaches a second set
    beside the first (links are multi-attach, both would see every socket); use one per test."""
    from sockops.loader import DataPlane
    from sockops.maps import MapSizes

    planes: list[Plane] = []

    def make(sizes: MapSizes | None = None) -> Plane:
        bpffs_dir = BPFFS_ROOT / f"{TEST_PREFIX}-{secrets.token_hex(4)}"
        assert cgroup.path != cgroup.root, "never attach to the cgroup v2 root"
        # Registered before loading: a load that fails half way may leave the directory and
        # some pinned maps behind, and teardown must remove them too.
        plane = Plane(dp=None, maps=None, bpffs_dir=bpffs_dir, cgroup=cgroup.path)
        planes.append(plane)
        plane.dp = DataPlane.load(bpffs_dir, sizes or MapSizes())
        plane.dp.attach(cgroup.path)
        plane.maps = plane.dp.maps()
        return plane

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for plane in reversed(planes):
            try:
                _teardown_plane(plane)
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def dataplane(make_dataplane: Callable[..., Plane]) -> Plane:
    """The data plane with default map sizes (a load takes ~0.3 s here, so one per test)."""
    return make_dataplane()


@pytest.fixture
def inserter(dataplane: Plane) -> Iterator[Any]:
    """Late insertion passes (sockops/late.py) on the test's data plane, as the agent runs them."""
    from sockops import late

    ins = late.inserter(dataplane.dp)
    assert ins is not None, dataplane.dp.notes
    yield ins
    ins.close()


# -- labs ----------------------------------------------------------------------------------------


@pytest.fixture
def make_lab(cgroup: Cgroup) -> Iterator[Callable[[], Lab]]:
    """Factory for Labs in the test cgroup (two Labs may reuse the same pod IPs)."""
    labs: list[Lab] = []

    def make() -> Lab:
        lab = Lab(cgroup, prefix=TEST_PREFIX)
        labs.append(lab)
        return lab.start()

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for lab in reversed(labs):
            try:
                lab.close()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def lab(make_lab: Callable[[], Lab]) -> Lab:
    return make_lab()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """Where helpers put server stderr (opened by root, inherited by UID 1000 children)."""
    return tmp_path
