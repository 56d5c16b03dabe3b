"""Can acceleration run on this machine? Each probe says what it found and, if it fails, the fix.

The last probe compiles and loads the real programs (into a scratch bpffs directory it removes),
so "ok" means the kernel's verifier accepted exactly what the agent would attach: every program
type, map type and helper it needs, not a guess from a version number.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sockops import loader
from sockops.cgroups import find_cgroup2_root
from sockops.errors import SockopsError

MIN_KERNEL = (5, 15)  # sk_storage + netns cookie in sk_msg, BPF atomics, HDR_OPT callbacks


@dataclass
class Probe:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or os.uname().release
    parts = release.split("-")[0].split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def probe_all(
    bpffs_root: Path = Path("/sys/fs/bpf"), cgroup: Path | None = None, bpffs_dir: Path | None = None
) -> list[Probe]:
    """``bpffs_dir`` is the agent's pin directory, whose sockhash and links the hook probes read."""
    probes: list[Probe] = []
    release = os.uname().release
    kv = kernel_version(release)
    probes.append(
        Probe(
            "kernel",
            kv >= MIN_KERNEL,
            f"{release}",
            f"needs Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer",
        )
    )
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    probes.append(
        Probe(
            "btf",
            btf,
            "/sys/kernel/btf/vmlinux" + ("" if btf else " missing"),
            "a kernel built with CONFIG_DEBUG_INFO_BTF",
            required=False,
        )
    )
    probes.append(
        Probe(
            "root",
            os.geteuid() == 0,
            f"euid {os.geteuid()}",
            "run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
        )
    )
    cg: Path | None = None
    try:
        cg = cgroup or find_cgroup2_root()
        loader.check_cgroup_v2(cg)
        probes.append(Probe("cgroup_v2", True, str(cg)))
    except Exception as e:
        probes.append(Probe("cgroup_v2", False, str(e), "mount -t cgroup2 none /sys/fs/cgroup/unified"))
    try:
        loader.check_bpffs(bpffs_root / "sockops")
        probes.append(Probe("bpffs", True, str(bpffs_root)))
    except SockopsError as e:
        probes.append(Probe("bpffs", False, str(e), "mount -t bpf bpf /sys/fs/bpf"))
    try:
        tree = loader.check_headers()
        via = " (BCC_KERNEL_SOURCE)" if str(tree) == os.environ.get("BCC_KERNEL_SOURCE") else ""
        probes.append(Probe("kernel_headers", True, f"{tree}{via}"))
    except SockopsError as e:
        probes.append(_headers_missing(release, str(e)))
    try:
        import bcc  # noqa: F401

        probes.append(Probe("bcc", True, "python bcc module importable"))
    except ImportError:
        probes.append(Probe("bcc", False, "python bcc module missing", "apt-get install python3-bpfcc"))

    if all(p.ok for p in probes if p.required):
        probes.extend(_probe_load(bpffs_root))
        assert cg is not None  # the cgroup_v2 probe passed
        probes += probe_hooks(cg, bpffs_dir or bpffs_root / "sockops")
    else:
        probes.append(Probe("programs_load", False, "skipped: fix the failures above first"))
    return probes


# Where the container image keeps its kernel headers (Dockerfile, `headers` stage).
IMAGE_HEADERS = "/opt/sockops/kernel-headers"


def probe_hooks(cgroup: Path, bpffs_dir: Path) -> list[Probe]:
    """One probe per hook sockops uses: which other programs share it, and whether they can.

    Programs on a multi-attach cgroup hook all run, so sharing is fine; a program attached
    exclusively (without BPF_F_ALLOW_MULTI) leaves no room for sockops' link, and a second
    sk_msg program cannot share sockops' sockhash. Those fail the probe.
    """
    from sockops import links

    try:
        hooks = links.hooks(cgroup, bpffs_dir)
    except (SockopsError, OSError) as e:
        # Not a verdict on the hooks: the attach itself will say what is wrong, if anything.
        return [Probe("hooks", False, f"cannot list the programs on the hooks: {e}", "", required=False)]
    probes = []
    for hook in hooks:
        ok, why = hook.verdict()
        progs = ", ".join(f"{p['name']} (id {p['id']}, {p['owner']})" for p in hook.programs)
        detail = f"{hook.target}: {progs or 'nothing attached'}; {why}" if hook.exists else why
        if ok:
            fix = ""
        elif hook.kind == "sk_msg":
            fix = "detach the other sk_msg program from sockops' sockhash (bpftool map show, prog show)"
        else:
            fix = "that tool must attach with BPF_F_ALLOW_MULTI or a BPF link (bpftool cgroup show)"
        probes.append(Probe(f"hook_{hook.kind}", ok, detail, fix))
    return probes


def in_container() -> bool:
    """True inside a docker/podman container or a Kubernetes pod."""
    return (
        Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
        or "KUBERNETES_SERVICE_HOST" in os.environ
    )


def _headers_missing(release: str, message: str) -> Probe:
    """The headers probe's failure, worded for where the agent runs.

    In a container the fix is never "install a package": the sockops image carries headers at
    IMAGE_HEADERS and points BCC_KERNEL_SOURCE at them (the programs use only UAPI structures, so
    any version from 5.15 on serves), so a failure there means that variable was changed, or the
    image is not the project's. Host headers mounted from the node work too: a /lib/modules link
    that dangles means /lib/modules was mounted without /usr/src, where Debian's links point.
    """
    if not in_container():
        return Probe("kernel_headers", False, message, "install linux-headers-amd64 and link them")
    build = Path(f"/lib/modules/{release}/build")
    source = os.environ.get("BCC_KERNEL_SOURCE")
    if source is not None:
        detail = (
            f"no kernel headers for {release} in this container: BCC_KERNEL_SOURCE={source} "
            "is no whole header tree (no include/linux/kconfig.h)"
        )
    elif build.is_symlink() and not build.exists():
        detail = (
            f"no kernel headers for {release} in this container: {build} points at "
            f"{os.readlink(build)}, which is not mounted"
        )
    else:
        detail = (
            f"no kernel headers for {release} in this container (BCC_KERNEL_SOURCE unset, {build} not found)"
        )
    fix = (
        f"the sockops image carries headers: set BCC_KERNEL_SOURCE={IMAGE_HEADERS} (the image's default), "
        "or unset it and mount the host's read-only: -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro"
    )
    return Probe("kernel_headers", False, detail, fix)


def _probe_load(bpffs_root: Path) -> list[Probe]:
    """The real programs, then the two optional parts, which the data plane runs without: late
    insertion (a tcp iterator) and the reader hook (a raw tracepoint)."""

    scratch = bpffs_root / f"sockops-doctor-{uuid.uuid4().hex[:8]}"
    try:
        plane = loader.DataPlane.load(scratch, loader.MapSizes(sockhash=16, pending=16, netns=4))
        loaded = "sock_ops + sk_msg programs, sockhash, sk_storage, pinned maps"
        probes = [Probe("programs_load", True, loaded)]
        late_ok = loader.PROG_LATE in plane.programs
        probes.append(
            Probe(
                "late_insertion",
                late_ok,
                "bpf_iter/tcp loads: connections from before an opt-in join later"
                if late_ok
                else "the tcp iterator did not load: connections are accelerated from their handshake only",
                "" if late_ok else "a kernel with bpf_iter/tcp (5.9+) and BTF",
                required=False,
            )
        )
        hook_ok = loader.PROG_READER in plane.programs
        probes.append(
            Probe(
                "reader_hook",
                hook_ok,
                "raw tracepoint sys_enter loads: a socket gets a psock once its program has read with "
                "recv(), and programs that splice() stay on plain TCP"
                if hook_ok
                else "no raw tracepoint here: nothing is known of how programs read, so splice() readers "
                "are not kept out (docs/DATAPLANE.md, Splice readers)",
                ""
                if hook_ok
                else "allow raw tracepoints (x86-64), or keep splice readers out of enabled pods",
                required=False,
            )
        )
        del plane
        return probes
    except SockopsError as e:
        return [Probe("programs_load", False, str(e), "see the verifier message above")]
    finally:
        loader.unpin(scratch)
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)


def verdict(probes: list[Probe]) -> bool:
    return all(p.ok for p in probes if p.required)


def render(probes: list[Probe], as_json: bool) -> str:
    ok = verdict(probes)
    if as_json:
        return json.dumps({"ok": ok, "probes": [asdict(p) for p in probes]}, indent=2)
    lines = []
    for p in probes:
        mark = "ok  " if p.ok else ("FAIL" if p.required else "warn")
        lines.append(f"  [{mark}] {p.name:<15} {p.detail}")
        if not p.ok and p.fix:
            lines.append(f"         fix: {p.fix}")
    lines.append("")
    lines.append("verdict: acceleration can run here" if ok else "verdict: acceleration can NOT run here")
    return "\n".join(lines)
