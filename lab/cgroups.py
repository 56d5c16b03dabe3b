"""Throw-away cgroup v2 children for the processes that sockops accelerates.

BPF ``sock_ops`` programs are attached to a cgroup v2 directory and see only the sockets of the
processes inside it (and of its descendants). The demo, the benchmark and the tests therefore put every
process they start (Envoy sidecars, apps, load generators) in a private child cgroup, so that:

* the programs never see the sockets of unrelated processes on the machine (docs/DATAPLANE.md F10: only
  opted-in pods' sockets may go in the map);
* tearing down is reliable: everything still alive in the cgroup is killed on exit, even processes
  that forked, double-forked or changed their UID, because cgroup membership is inherited and cannot
  be left by an unprivileged process.

The children are created under the cgroup v2 root that :func:`sockops.cgroups.find_cgroup2_root`
finds, the same one the agent attaches to.

Nothing here moves a process that the caller did not name: the root cgroup's members stay where they
are, and the kill on exit only reaches processes inside the child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sockops.cgroups import DEFAULT_ROOT, CgroupError, find_cgroup2_root

__all__ = [
    "DEFAULT_ROOT",
    "Cgroup",
    "CgroupError",
    "find_cgroup2_root",
    "join_cgroup",
    "preexec_join",
]


def join_cgroup(path: str | os.PathLike[str]) -> None:
    """Move the *calling* process into the cgroup directory ``path``.

    Writing ``0`` to ``cgroup.procs`` means "the writer", so no getpid() is needed; that keeps the
    function safe to call between fork() and exec() (a subprocess ``preexec_fn``). It must run before
    the process drops privileges and before ``ip netns exec`` style /sys remounts hide the tree.
    """
    fd = os.open(os.path.join(os.fspath(path), "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


def preexec_join(path: str | os.PathLike[str]) -> Callable[[], None]:
    """Return a zero-argument callable for ``subprocess.Popen(preexec_fn=...)`` that joins ``path``.

    The path is converted to ``str`` up front so the child does as little as possible after fork().
    """
    target = os.fspath(path)

    def _join() -> None:
        join_cgroup(target)

    return _join


def _read_pids(procs_file: Path) -> list[int]:
    try:
        text = procs_file.read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


class Cgroup:
    """A uniquely named cgroup v2 child that is emptied and removed on exit.

    Usage::

        with Cgroup("sockops-test-") as cg:
            subprocess.Popen(argv, preexec_fn=cg.preexec_fn())
            ...  # attach BPF programs to cg.path
        # every process still inside was SIGKILLed and the directory is gone

    ``root`` is the parent directory (default: the cgroup v2 mount point, see
    :func:`find_cgroup2_root`); pass another cgroup's path to nest.
    """

    def __init__(
        self,
        prefix: str = "sockops-",
        root: str | os.PathLike[str] | None = None,
        kill_timeout: float = 10.0,
    ) -> None:
        if "/" in prefix:
            raise ValueError("cgroup name prefix must not contain '/'")
        self.root: Path = Path(root) if root is not None else find_cgroup2_root()
        self.kill_timeout = kill_timeout
        self.path: Path = self._create(prefix)
        self._closed = False

    def _create(self, prefix: str) -> Path:
        # A random suffix (not the pid) so that two instances in one process, or a stale directory
        # from a crashed run, never collide.
        for _ in range(16):
            path = self.root / f"{prefix}{secrets.token_hex(4)}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup under {self.root}: {exc}") from exc
            return path
        raise CgroupError(f"could not find a free cgroup name under {self.root}")

    # -- membership -----------------------------------------------------------------------------

    def add_pid(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup."""
        try:
            (self.path / "cgroup.procs").write_text(str(int(pid)))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {exc}") from exc

    def pids(self, recursive: bool = False) -> list[int]:
        """Processes in this cgroup (and, with ``recursive``, in its descendants)."""
        dirs = [self.path]
        if recursive:
            dirs = [Path(d) for d, _, _ in os.walk(self.path)]
        out: list[int] = []
        for d in dirs:
            out.extend(_read_pids(d / "cgroup.procs"))
        return out

    def preexec_fn(self) -> Callable[[], None]:
        """A ``preexec_fn`` (or a first step of one) that moves the child into this cgroup."""
        return preexec_join(self.path)

    def open_fd(self) -> int:
        """Open the directory (O_RDONLY) for BPF attach calls; the caller closes the fd."""
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)

    # -- teardown -------------------------------------------------------------------------------

    def _populated(self) -> bool:
        """True while any live process is in the subtree (zombies do not count for rmdir)."""
        try:
            for line in (self.path / "cgroup.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() == "1"
        except FileNotFoundError:
            return False
        return bool(self.pids(recursive=True))

    def _rescue_self(self) -> None:
        """If this very process was put inside, step out to the parent instead of killing ourselves."""
        me = os.getpid()
        for d, _, _ in os.walk(self.path):
            if me in _read_pids(Path(d) / "cgroup.procs"):
                with contextlib.suppress(OSError):
                    (self.path.parent / "cgroup.procs").write_text(str(me))

    def kill(self, timeout: float | None = None) -> None:
        """SIGKILL every process in the subtree and wait (bounded) until it is empty."""
        timeout = self.kill_timeout if timeout is None else timeout
        self._rescue_self()
        kill_file = self.path / "cgroup.kill"
        deadline = time.monotonic() + timeout
        while self._populated():
            if kill_file.exists():
                # Kernel >= 5.14: kills the whole subtree atomically, including processes forked
                # while we iterate, which a pid loop can miss.
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            else:
                for pid in self.pids(recursive=True):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path} still has processes after {timeout}s: {self.pids(True)}")
            time.sleep(0.02)

    def remove(self, timeout: float | None = None) -> None:
        """Kill what is left, then rmdir the cgroup and any descendants (deepest first)."""
        timeout = self.kill_timeout if timeout is None else timeout
        if not self.path.exists():
            return
        self.kill(timeout)
        deadline = time.monotonic() + timeout
        for d, _, _ in sorted(os.walk(self.path), key=lambda w: -len(Path(w[0]).parts)):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY can linger for a moment while the last tasks finish exiting.
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove {d}: {exc}") from exc
                    time.sleep(0.02)

    def close(self) -> None:
        """Idempotent teardown: kill everything inside and remove the directory."""
        if self._closed:
            return
        self.remove()
        self._closed = True

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Cgroup({str(self.path)!r})"
