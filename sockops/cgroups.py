"""Where the cgroup v2 hierarchy is mounted: the agent attaches ``sock_ops`` to its root.

The lab's throw-away children (lab/cgroups.py) are created under the same root.
A hybrid hierarchy mounts cgroup v1 controllers under ``/sys/fs/cgroup`` and v2 at
``/sys/fs/cgroup/unified``; v2 is what BPF needs, so that is the default, and if it is absent the first
``cgroup2`` mount in ``/proc/mounts`` is used.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_ROOT", "CgroupError", "find_cgroup2_root"]

DEFAULT_ROOT = Path("/sys/fs/cgroup/unified")


class CgroupError(RuntimeError):
    """A cgroup could not be found, created, emptied or removed."""


def _cgroup2_mounts() -> list[Path]:
    """Mount points of type cgroup2, in /proc/mounts order."""
    mounts: list[Path] = []
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 3 and fields[2] == "cgroup2":
                    # /proc/mounts escapes blanks as octal (\040); undo it.
                    mounts.append(Path(fields[1].encode().decode("unicode_escape")))
    except OSError:
        pass
    return mounts


def find_cgroup2_root(default: str | os.PathLike[str] = DEFAULT_ROOT) -> Path:
    """Return the cgroup v2 mount point to create children under.

    ``default`` wins when it is a cgroup v2 mount (or at least looks like a v2 directory, which
    covers bind mounts and containers whose /proc/mounts shows a different path); otherwise the
    first cgroup2 mount found in /proc/mounts is used.
    """
    default = Path(default)
    mounts = _cgroup2_mounts()
    looks_v2 = (default / "cgroup.procs").exists() and (default / "cgroup.controllers").exists()
    if default in mounts or looks_v2:
        return default
    for mount in mounts:
        if (mount / "cgroup.procs").exists():
            return mount
    raise CgroupError(f"no cgroup v2 hierarchy found ({default} absent, no cgroup2 in /proc/mounts)")
