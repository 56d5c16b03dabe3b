"""What the benchmark runs on: a private cgroup, the sockops data plane, and two-pod mesh labs.

Everything is created under names starting with :data:`PREFIX` (cgroups ``sockops-bench-*``,
network namespaces ``sockops-bench-*``, bpffs ``/sys/fs/bpf/sockops-bench-*``), so a check for
leftovers needs nothing but that prefix. The data plane is attached to the benchmark's own cgroup
v2 child, never to the machine's root cgroup; pods run in child cgroups of it (BPF cgroup programs
apply to descendants), one per pod, so each pod's CPU time can be read from its ``cpu.stat``.

sockops states, as the benchmark switches them between runs:

* ``off``: no program attached to the cgroup (the plain kernel path);
* ``loaded``: programs attached, no namespace enabled (what a pod that has not opted in sees);
* ``on``: programs attached and both pods' namespaces enabled with :func:`sockops.netns.settings_for`.

Before every switch all established TCP connections in the lab's pods are destroyed (``ss -K``):
Envoy keeps pooled upstream connections, and one made in an ``on`` run would otherwise still be
accelerated in the next ``off`` run (and the other way round).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cgroups import Cgroup
from lab.podlab import APP_UID, SERVICE_IP, Lab, Pod, Service
from sockops import loader, netns

PREFIX = "sockops-bench"
BPFFS_ROOT = Path("/sys/fs/bpf")
APP_PORT = 8080
CLIENT_IP = "10.244.1.10"
SERVER_IP = "10.244.2.10"
PINGPONG_IP = "10.244.3.10"
STATES = ("off", "loaded", "on")

# mode -> (client pod has a sidecar, server pod has a sidecar), as in Istio's perf/benchmark.
MODES: dict[str, tuple[bool, bool]] = {
    "baseline": (False, False),
    "both": (True, True),
    "client": (True, False),
    "server": (False, True),
}


class BenchError(RuntimeError):
    """The benchmark's test bed could not be built or switched."""


def cgroup_cpu_usec(path: Path, field: str = "usage_usec") -> int:
    """CPU time (µs) of every process that ever ran in the cgroup subtree (``cpu.stat``);
    ``field`` "system_usec" gives the kernel part (where sockops can save anything at all).

    These fields are kept by the cgroup core even without the cpu controller, so this works on the
    hybrid hierarchy where no controller is enabled on the v2 tree.
    """
    for line in (path / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == field:
            return int(value)
    raise BenchError(f"no {field} in {path / 'cpu.stat'}")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have been busy since boot (/proc/stat: user, nice, system,
    irq, softirq; not idle, iowait or the hypervisor's steal). Minus the pods' own CPU over a run,
    it shows how much *other* work shared the machine."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu_ns(pid: int) -> int:
    """CPU time (ns) of all threads of a process, from per-thread schedstat (ns resolution, unlike
    the 10 ms ticks of /proc/PID/stat)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


class SockopsSwitch:
    """sockops loaded once for the whole benchmark, switched between off, loaded and on."""

    def __init__(self, cgroup: Path) -> None:
        if cgroup == cgroup.parent or not cgroup.name.startswith(PREFIX):
            raise BenchError(f"refusing to attach to {cgroup}: only to the benchmark's own cgroup")
        self.cgroup = cgroup
        self.bpffs = BPFFS_ROOT / f"{PREFIX}-{secrets.token_hex(4)}"
        self.state = "off"
        self._plane: loader.DataPlane | None = None
        self._maps: loader.PinnedMaps | None = None
        self._cookies: dict[str, int] = {}

    def load(self) -> SockopsSwitch:
        self._plane = loader.DataPlane.load(
            self.bpffs, loader.MapSizes(sockhash=8192, pending=4096, netns=16)
        )
        self._maps = self._plane.maps()
        return self

    @property
    def maps(self) -> loader.PinnedMaps:
        if self._maps is None:
            raise BenchError("data plane not loaded")
        return self._maps

    def set_state(self, state: str, pods: list[Pod]) -> None:
        """Switch to ``state`` for these pods (see module doc)."""
        if state not in STATES:
            raise ValueError(f"unknown sockops state {state!r}")
        assert self._plane is not None
        for cookie in self._cookies.values():
            self.maps.disable(cookie)
        self._cookies.clear()
        if state == "off":
            loader.detach_all(self.cgroup, self.bpffs)
        else:
            self._plane.attach(self.cgroup)
        if state == "on":
            for pod in pods:
                cookie = netns.cookie(pod.netns_path)
                self.maps.enable(cookie, netns.settings_for(pod.netns_path))
                self._cookies[pod.name] = cookie
        self.state = state

    def snapshot(self) -> dict[str, int]:
        """Global counters (redirected bytes, misses, pairings) to subtract around a run."""
        return self.maps.counters()

    def sockets_active(self) -> int:
        return len(self.maps.sockets())

    def close(self) -> None:
        """Detach, close, unpin; safe to call twice and after a failed load."""
        with contextlib.suppress(Exception):
            loader.detach_all(self.cgroup, self.bpffs)
        if self._maps is not None:
            with contextlib.suppress(Exception):
                self._maps.close()
            self._maps = None
        if self._plane is not None:
            with contextlib.suppress(Exception):
                self._plane.bpf.close()  # type: ignore[attr-defined]
            self._plane = None
        loader.unpin(self.bpffs)
        if self.bpffs.exists():
            raise BenchError(f"{self.bpffs} still exists after unpin")


@dataclass
class CpuSample:
    """CPU counters at one instant: per pod cgroup (µs) and per Envoy process (ns)."""

    pods_usec: dict[str, int]
    envoys_ns: dict[str, int]
    pods_sys_usec: dict[str, int]

    def seconds_since(self, before: CpuSample) -> dict[str, float]:
        out = {f"pod_{k}": (v - before.pods_usec[k]) / 1e6 for k, v in self.pods_usec.items()}
        out |= {f"pod_{k}_sys": (v - before.pods_sys_usec[k]) / 1e6 for k, v in self.pods_sys_usec.items()}
        out |= {f"envoy_{k}": (v - before.envoys_ns.get(k, 0)) / 1e9 for k, v in self.envoys_ns.items()}
        return out


# nginx refuses a `return` string much longer than this ("too long parameter").
NGINX_INLINE_MAX = 3072


def _nginx_response(workdir: Path, payload: int) -> str:
    """The location block answering every request (POST included) with ``payload`` bytes.

    Small bodies are inline (`return 200`); larger ones are a file in ``workdir``, served for
    POST too by turning the static module's 405 into a 200 with the same file.
    """
    if payload <= NGINX_INLINE_MAX:
        return f'location / {{ return 200 "{"x" * payload}"; }}'
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / "body").write_bytes(b"x" * payload)
    return f"location / {{ root {www}; try_files /body =404; error_page 405 =200 $uri; }}"


def _nginx_conf(workdir: Path, payload: int, workers: int) -> str:
    return f"""daemon off;
master_process {"on" if workers > 1 else "off"};
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size {max(16384, payload * 2)};
    client_max_body_size {max(1048576, payload * 2)};
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type application/octet-stream;
    server {{
        listen 0.0.0.0:{APP_PORT} backlog=4096;
        {_nginx_response(workdir, payload)}
    }}
}}
"""


class MeshLab:
    """Two pods (client, server) in one podlab Lab, arranged for one benchmark mode.

    The server pod runs nginx (answers every request with ``payload`` bytes, reading and dropping
    the request body); the client pod runs the load generator. With a client sidecar the client
    dials the lab's service IP, which its Envoy routes to the server pod (as a ClusterIP would be);
    without one it dials the server pod's IP. A server sidecar captures inbound on 15006 and hands
    the request to nginx from 127.0.0.6. Envoys speak HTTP (http_connection_manager), as Istio's do
    on an HTTP port.
    """

    def __init__(
        self,
        root: Cgroup,
        mode: str,
        payload: int,
        envoy_workers: int = 2,
        nginx_workers: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
        self.root = root
        self.mode = mode
        self.payload = payload
        self.envoy_workers = envoy_workers
        self.nginx_workers = nginx_workers
        self.lab: Lab | None = None
        self.cgroups: dict[str, Cgroup] = {}
        self.pods: dict[str, Pod] = {}
        self.workdir: Path | None = None
        self.nginx: subprocess.Popen[Any] | None = None

    def __enter__(self) -> MeshLab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        client_sidecar, server_sidecar = MODES[self.mode]
        self.lab = Lab(self.root, prefix=PREFIX).start()
        for name in ("client", "server"):
            self.cgroups[name] = Cgroup(prefix=f"{name}-", root=self.root.path)
        self.pods["server"] = self.lab.add_pod(
            "server",
            ip=SERVER_IP,
            sidecar=server_sidecar,
            envoy_concurrency=self.envoy_workers,
            protocol="http",
            app_ports=(APP_PORT,),
            cgroup=self.cgroups["server"].path,
        )
        self.pods["client"] = self.lab.add_pod(
            "client",
            ip=CLIENT_IP,
            sidecar=client_sidecar,
            envoy_concurrency=self.envoy_workers,
            protocol="http",
            services=[Service(APP_PORT, SERVER_IP)],
            cgroup=self.cgroups["client"].path,
        )
        self._start_nginx()

    def _start_nginx(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-nginx-"))
        conf = self.workdir / "nginx.conf"
        conf.write_text(_nginx_conf(self.workdir, self.payload, self.nginx_workers))
        os.chown(self.workdir, APP_UID, APP_UID)
        self.workdir.chmod(0o755)
        conf.chmod(0o644)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        server = self.pods["server"]
        self.nginx = server.popen(
            [nginx, "-p", str(self.workdir), "-c", str(conf), "-e", str(self.workdir / "nginx.error.log")],
            uid=APP_UID,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        from bench.load import LoadError, wait_listening

        try:
            wait_listening(server, APP_PORT)
        except LoadError as e:
            log = (self.workdir / "nginx.error.log").read_text(errors="replace") if self.workdir else ""
            raise BenchError(f"nginx did not start in the server pod: {log[-800:]}") from e

    @property
    def url(self) -> str:
        """What the client app dials: the service IP through its sidecar, else the server pod."""
        host = SERVICE_IP if MODES[self.mode][0] else SERVER_IP
        return f"http://{host}:{APP_PORT}/"

    @property
    def pod_list(self) -> list[Pod]:
        return [self.pods["client"], self.pods["server"]]

    def probe_server(self) -> None:
        """A readiness probe of nginx before each run (kubelet's would do it in a cluster): once
        the reader hook has seen nginx read a connection of its port, sockops accelerates the
        port's connections, Envoy's upstream pool included, which otherwise opens its keep-alive
        connections before nginx has read anything and keeps them on TCP for the whole run
        (docs/DATAPLANE.md, "Splice readers"). The probe itself goes over TCP, before the run."""
        self.pods["server"].probe(APP_PORT, times=1)

    def reset_connections(self) -> None:
        """Destroy every established TCP connection in both pods (Envoy's pools included), and
        every TIME-WAIT socket: a run of short-lived connections leaves tens of thousands, and the
        next run's connect() would search the ephemeral port range past them (measured: the client
        pod's kernel time took the machine and QPS fell tenfold from the third run on), so the run
        after it -- always the same state in the interleaved order -- would pay for it."""
        for pod in self.pod_list:
            res = pod.run(["ss", "-K", "-t", "state", "established", "state", "time-wait"], timeout=10)
            if res.returncode != 0:
                raise BenchError(f"ss -K in pod {pod.name} failed: {res.stderr!r}")

    def time_wait_sockets(self) -> int:
        """TIME-WAIT sockets in both pods (0 right after :meth:`reset_connections`)."""
        total = 0
        for pod in self.pod_list:
            res = pod.run(["ss", "-H", "-t", "state", "time-wait"], timeout=10, text=True)
            total += len(res.stdout.splitlines())
        return total

    def cpu(self) -> CpuSample:
        pods = {name: cgroup_cpu_usec(cg.path) for name, cg in self.cgroups.items()}
        sys_ = {name: cgroup_cpu_usec(cg.path, "system_usec") for name, cg in self.cgroups.items()}
        envoys = {p.name: process_cpu_ns(p.envoy.pid) for p in self.pod_list if p.envoy is not None}
        return CpuSample(pods, envoys, sys_)

    def envoy_version(self) -> str:
        for pod in self.pod_list:
            if pod.envoy is not None:
                return pod.admin("/server_info").split('"version": "', 1)[-1].split('"', 1)[0]
        return ""

    def close(self) -> None:
        errors: list[BaseException] = []
        if self.lab is not None:
            try:
                self.lab.close()
            except Exception as e:
                errors.append(e)
            self.lab = None
        for cg in self.cgroups.values():
            try:
                cg.close()
            except Exception as e:
                errors.append(e)
        self.cgroups.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if errors:
            raise BenchError(f"tearing down the {self.mode} lab: {errors[0]!r}") from errors[0]


class PingpongLab:
    """One pod without a sidecar, for raw TCP and AF_UNIX ping-pong and iperf3 inside it."""

    def __init__(self, root: Cgroup) -> None:
        self.root = root
        self.lab: Lab | None = None
        self.pod: Pod | None = None
        self.workdir: Path | None = None

    def __enter__(self) -> PingpongLab:
        try:
            self.lab = Lab(self.root, prefix=PREFIX).start()
            self.pod = self.lab.add_pod("pingpong", ip=PINGPONG_IP, sidecar=False)
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-pp-"))
            os.chown(self.workdir, APP_UID, APP_UID)
            self.workdir.chmod(0o755)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cpu_usec(self) -> int:
        """CPU of everything in the benchmark's cgroup (only this lab runs while it is measured)."""
        return cgroup_cpu_usec(self.root.path)

    def reset_connections(self) -> None:
        assert self.pod is not None
        self.pod.run(["ss", "-K", "-t", "state", "established", "state", "time-wait"], timeout=10)

    def close(self) -> None:
        if self.lab is not None:
            lab, self.lab = self.lab, None
            lab.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def wait_drained(plane: SockopsSwitch, timeout: float = 5.0) -> int:
    """Wait until the sockhash is empty (all accelerated sockets closed); returns what is left."""
    deadline = time.monotonic() + timeout
    left = plane.sockets_active()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = plane.sockets_active()
    return left
