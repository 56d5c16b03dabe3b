"""A docker engine for the tests, and images made on this machine without any image registry.

Loaded as a pytest plugin from conftest.py. Fixtures:

* ``docker_engine`` (session): the machine's dockerd when ``/var/run/docker.sock`` answers
  (``owned=False``: the tests never stop it), else a dockerd this session starts itself with its
  own data root, exec root and socket, stopped at the end of the session (also on failure or
  Ctrl-C). ``--iptables=false --bridge=none``: the test containers use ``--network none``, so the
  daemon never touches the host's firewall or bridges. Tests that restart the daemon ask
  ``engine.owned`` first.
* ``busybox_image`` (session): ``sockops-test-busybox:<busybox version>``, the statically linked
  busybox from Debian's ``busybox-static`` in an otherwise empty root, ``docker import``-ed.
* ``containers``: busybox containers started by a test (``--network none`` by default), removed
  with their cgroup parents at the end.
* ``base_image`` (session): ``sockops-base:bookworm``, a ``debootstrap --variant=minbase`` root
  ``docker import``-ed, the base the Dockerfile names. The mirror comes from this machine's apt
  sources at run time.

Images are cached by tag on purpose: the data root of the owned daemon persists across sessions
(``/var/lib/sockops-test-docker``), so a second run finds them and only the first pays for
debootstrap. Two sessions on one machine must not share a daemon (one may restart it under the
other), so the persistent data root is guarded by a lock; a session that cannot take it runs a
private daemon with a throw-away data root (correct, only slower: nothing is cached).

Nothing here writes a registry or mirror host name anywhere: the mirror is read from
/etc/apt/sources.list(.d) when it is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SYSTEM_SOCKET = Path("/var/run/docker.sock")
STATE_ROOT = Path("/var/lib/sockops-test-docker")
RUN_ROOT = Path("/run/sockops-test-docker")
LOCK_FILE = Path("/var/lib/sockops-test-docker.lock")
# Containers of the owned daemon go under this cgroup parent (in every hierarchy), so that its
# teardown can remove what docker created instead of leaving /docker behind.
CGROUP_PARENT = "sockops-test-dockerd"
CGROUP_FS = Path("/sys/fs/cgroup")
BASE_TAG = "sockops-base:bookworm"
SUITE = "bookworm"
START_TIMEOUT = 60.0


def docker_skip_reason() -> str | None:
    """Why no docker engine can be used here, or None."""
    if os.geteuid() != 0:
        return "docker tests need root (they start dockerd when none runs)"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is missing: pip install -e '.[agent]'"
    if not shutil.which("docker"):
        return "no docker CLI: apt-get install docker.io (scripts/setup.sh does)"
    if not _answers(f"unix://{SYSTEM_SOCKET}") and not shutil.which("dockerd"):
        return "no dockerd running and none installed: apt-get install docker.io (scripts/setup.sh does)"
    return None


def _answers(url: str, timeout: float = 3.0) -> bool:
    import docker

    try:
        client = docker.APIClient(base_url=url, timeout=timeout, version="auto")
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@dataclass
class DockerEngine:
    """A reachable docker daemon; ``owned`` when this session started it (and may restart it)."""

    host: str
    owned: bool
    state_root: Path | None = None
    run_root: Path | None = None
    persistent: bool = True
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _lock_fd: int | None = field(default=None, repr=False)

    # -- clients --------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment for the docker CLI (and for code reading DOCKER_HOST)."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def api(self, timeout: float = 60.0) -> Any:
        """A low-level docker.APIClient for this daemon (the caller closes it)."""
        import docker

        return docker.APIClient(base_url=self.host, timeout=timeout, version="auto")

    def cli(
        self, *args: str, timeout: float = 120.0, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon; on failure the error says what it printed."""
        res = subprocess.run(
            ["docker", *args],
            env=self.env,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
            )
        return res

    def cgroup_driver(self) -> str:
        api = self.api()
        try:
            return str(api.info().get("CgroupDriver", ""))
        finally:
            api.close()

    def image_exists(self, tag: str) -> bool:
        return self.cli("image", "inspect", tag, check=False).returncode == 0

    # -- the owned daemon -----------------------------------------------------------------------

    def _argv(self) -> list[str]:
        assert self.state_root and self.run_root
        return [
            shutil.which("dockerd") or "dockerd",
            f"--data-root={self.state_root}",
            f"--exec-root={self.run_root / 'exec'}",
            f"--pidfile={self.run_root / 'dockerd.pid'}",
            f"--host={self.host}",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--cgroup-parent={CGROUP_PARENT}",
            "--shutdown-timeout=2",
            "--log-level=warn",
        ]

    def start(self) -> None:
        """Start the owned daemon and wait until it answers."""
        assert self.owned and self.run_root and self.log_path
        self.run_root.mkdir(parents=True, exist_ok=True)
        _kill_stale(self.run_root / "dockerd.pid")
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C in the terminal goes to pytest, whose teardown stops the
            # daemon in order (SIGTERM, then containers are stopped by dockerd itself).
            self.proc = subprocess.Popen(
                self._argv(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if _answers(self.host, timeout=2.0):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dockerd did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the owned daemon (SIGTERM: it stops its containers and its containerd)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> None:
        assert self.owned, "only a daemon this session started may be restarted"
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop the daemon and remove what it made that is not a deliberate cache."""
        if not self.owned:
            return
        try:
            self.stop()
        finally:
            _remove_cgroup_parent(CGROUP_PARENT)
            if not self.persistent and self.state_root:
                _remove_tree(self.state_root)
            if self.run_root:  # runtime state (sockets, the default netns mount), never a cache
                _remove_tree(self.run_root)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None


def _kill_stale(pidfile: Path) -> None:
    """A daemon left by a session that was SIGKILLed: nobody holds the lock, so stop it."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not cmdline or not cmdline[0].endswith(b"dockerd") or str(pidfile).encode() not in b" ".join(cmdline):
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(300):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].encode().decode("unicode_escape")
        if point.startswith(prefix) or point == prefix[:-1]:
            out.append(point)
    return out


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount dockerd left behind (that would delete its contents)."""
    if not path.exists():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    if _mounts_under(path):
        raise RuntimeError(f"mounts remain under {path}; not removing it: {_mounts_under(path)}")
    shutil.rmtree(path, ignore_errors=True)


def _remove_cgroup_parent(name: str) -> None:
    """rmdir ``name`` (and empty children) in every cgroup hierarchy; docker never removes it."""
    remove_cgroup_dirs(name)


def remove_cgroup_dirs(name: str, keep: Path | None = None) -> None:
    """Remove the cgroup directory ``name`` (relative to each hierarchy's root) where it is empty.

    With the cgroupfs driver on this hybrid hierarchy, runc creates a container's cgroup under its
    cgroup parent in every v1 controller and in the unified tree, and removes only the container's
    own directory: the parent is left in each hierarchy. ``keep``: a hierarchy to leave alone
    (the test cgroup fixture removes its own directory in the v2 tree).
    """
    if not CGROUP_FS.is_dir():
        return
    for hierarchy in [CGROUP_FS, *CGROUP_FS.iterdir()]:
        if keep is not None and hierarchy == keep:
            continue
        target = hierarchy / name.strip("/")
        if hierarchy != CGROUP_FS and not hierarchy.is_dir():
            continue
        if not target.is_dir():
            continue
        for d, _, _ in sorted(os.walk(target), key=lambda t: len(t[0]), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    reason = docker_skip_reason()
    if reason:
        pytest.skip(reason)
    system = f"unix://{SYSTEM_SOCKET}"
    if _answers(system):
        yield DockerEngine(host=system, owned=False)
        return

    STATE_ROOT.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        state_root, run_root, persistent = STATE_ROOT, RUN_ROOT, True
    except BlockingIOError:
        # Another session owns the cached daemon and may restart it: run a private one.
        os.close(lock_fd)
        lock_fd = None  # type: ignore[assignment]
        state_root = Path(tempfile.mkdtemp(prefix="sockops-test-docker-", dir=STATE_ROOT.parent))
        run_root = Path(tempfile.mkdtemp(prefix="sockops-test-docker-", dir="/run"))
        persistent = False
    engine = DockerEngine(
        host=f"unix://{run_root / 'docker.sock'}",
        owned=True,
        state_root=state_root,
        run_root=run_root,
        persistent=persistent,
        log_path=tmp_path_factory.mktemp("dockerd") / "dockerd.log",
        _lock_fd=lock_fd,
    )
    try:
        engine.start()
        yield engine
    finally:
        engine.close()


def _busybox_version() -> str:
    out = subprocess.run(["busybox"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"BusyBox v([0-9.]+)", out)
    return m.group(1) if m else "unknown"


@pytest.fixture(scope="session")
def busybox_image(docker_engine: DockerEngine) -> str:
    """A tiny image: static busybox and its applets, nothing else (kept, cached by tag)."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("no /bin/busybox: apt-get install busybox-static (scripts/setup.sh does)")
    tag = f"sockops-test-busybox:{_busybox_version()}"
    if docker_engine.image_exists(tag):
        return tag
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="sockops-test-rootfs-") as d:
        root = Path(d)
        for sub in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            (root / sub).mkdir()
        (root / "tmp").chmod(0o1777)
        shutil.copy2(busybox, root / "bin" / "busybox")
        for name in applets.split():
            if name != "busybox" and "/" not in name:
                (root / "bin" / name).symlink_to("busybox")
        (root / "etc" / "passwd").write_text(
            "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        )
        tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True).stdout
    res = subprocess.run(
        ["docker", "import", "-c", 'CMD ["/bin/sh"]', "-c", "ENV PATH=/bin", "-", tag],
        input=tar,
        env=docker_engine.env,
        capture_output=True,
        check=False,
    )
    assert res.returncode == 0, f"docker import failed: {res.stderr.decode(errors='replace')}"
    return tag


def apt_mirrors(etc: Path = Path("/etc/apt")) -> dict[str, str]:
    """The Debian mirrors this machine's apt uses: ``{"debian": URL, "security": URL}`` (found ones).

    Reads deb822 ``*.sources`` and one-line ``sources.list`` entries, so neither the tests nor the
    repository ever name a mirror host themselves.
    """
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    for f in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    entries.append((m.group(1), [m.group(2)]))
    out: dict[str, str] = {}
    for uri, suites in entries:
        if not uri.startswith(("http://", "https://")):
            continue
        if f"{SUITE}-security" in suites or any(s.startswith(f"{SUITE}/updates") for s in suites):
            out.setdefault("security", uri.rstrip("/"))
        elif SUITE in suites:
            out.setdefault("debian", uri.rstrip("/"))
    return out


@pytest.fixture(scope="session")
def base_image(docker_engine: DockerEngine) -> str:
    """``sockops-base:bookworm``: debootstrap minbase, imported (cached by tag; ~30 s once)."""
    if docker_engine.image_exists(BASE_TAG):
        return BASE_TAG
    if not shutil.which("debootstrap"):
        pytest.skip("no debootstrap: apt-get install debootstrap (scripts/setup.sh does)")
    mirror = apt_mirrors().get("debian")
    if not mirror:
        pytest.skip(f"no Debian {SUITE} mirror in /etc/apt/sources.list(.d)")
    with tempfile.TemporaryDirectory(prefix="sockops-test-debootstrap-", dir="/var/tmp") as d:
        root = Path(d) / "root"
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", SUITE, str(root), mirror],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert res.returncode == 0, f"debootstrap failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        # Pure build input: no apt lists or caches in the layer.
        for sub in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for p in (root / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["docker", "import", "-c", 'CMD ["/bin/bash"]', "-", BASE_TAG],
            stdin=tar.stdout,
            env=docker_engine.env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        assert imp.returncode == 0, f"docker import failed: {imp.stderr.decode(errors='replace')}"
    return BASE_TAG


# -- containers -----------------------------------------------------------------------------------


class Containers:
    """Starts containers from the busybox image; removes them (and their cgroup parents) at the end."""

    def __init__(self, engine: DockerEngine, image: str, tools: Path | None = None) -> None:
        self.engine = engine
        self.image = image
        self.tools = tools  # mounted read-only at /t in every container (tests/support/nbclient.c)
        self.ids: list[str] = []
        self.cgroup_parents: set[str] = set()

    def run(
        self,
        *opts: str,
        labels: tuple[str, ...] = (),
        network: str = "none",
        cgroup_parent: str | None = None,
        cmd: tuple[str, ...] = ("sleep", "600"),
    ) -> str:
        name = f"sockops-test-{secrets.token_hex(4)}"
        argv = ["run", "-d", "--init", "--name", name, f"--network={network}"]
        if self.tools:
            argv += ["-v", f"{self.tools}:/t:ro"]
        for label in labels:
            argv += ["--label", label]
        if cgroup_parent:
            self.cgroup_parents.add(cgroup_parent)
            argv += [f"--cgroup-parent={cgroup_parent}"]
        res = self.engine.cli(*argv, *opts, self.image, *cmd, check=False)
        cid = res.stdout.strip()
        if cid:
            self.ids.append(cid)
        assert res.returncode == 0, f"docker run failed: {res.stderr}"
        return cid

    def inspect(self, cid: str) -> dict[str, Any]:
        api = self.engine.api()
        try:
            return dict(api.inspect_container(cid))
        finally:
            api.close()

    def close(self) -> None:
        if self.ids:
            self.engine.cli("rm", "-f", "-v", *self.ids, check=False, timeout=60)
        from sockops.cgroups import find_cgroup2_root

        for parent in self.cgroup_parents:
            remove_cgroup_dirs(parent, keep=find_cgroup2_root())


@pytest.fixture(scope="session")
def container_tools() -> Iterator[Path]:
    """tests/support/nbclient.c built static (busybox containers have no libc), in a directory
    the containers mount at /t: busybox's nc is a blocking client, which sockops never
    accelerates, so the traffic checks in containers use this event-loop client."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build tests/support/nbclient.c")
    d = Path(tempfile.mkdtemp(prefix="sockops-test-tools-"))
    try:
        d.chmod(0o755)
        src = Path(__file__).resolve().parent / "nbclient.c"
        res = subprocess.run(
            ["gcc", "-static", "-O2", "-Wall", "-o", str(d / "nbclient"), str(src)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.fail(f"building nbclient failed: {res.stderr}")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def containers(
    docker_engine: DockerEngine, busybox_image: str, container_tools: Path
) -> Iterator[Containers]:
    c = Containers(docker_engine, busybox_image, container_tools)
    try:
        yield c
    finally:
        c.close()
