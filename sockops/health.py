"""The agent's HTTP surface: /metrics, /healthz, /readyz and /status, and nothing else.

Kept to four read-only GET paths on purpose: the port is reachable from the node (hostNetwork),
so anything else answers 404 and no request can change state.

* ``/healthz`` (liveness): the control loop is turning. A loop stuck for several resync periods is
  a reason to restart the container; a lost API connection is not (sources retry on their own).
* ``/readyz`` (readiness): the programs are attached and every source's first list has been
  enforced, so the node's opted-in pods are accelerated.
* ``/status``: what ``sockops status`` shows about workloads, as JSON (each workload's state and
  reason, the agent's own state): read by the ``kubectl sockops`` plugin through the API server's
  pod proxy, so an app team learns why its pod is (not) accelerated without exec into the agent.
  It tells no more than ``/metrics`` already does (pod names, per node).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("sockops.health")

Check = Callable[[], tuple[bool, str]]
Status = Callable[[], dict[str, object]]


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port), with a message that says the format."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics-addr {addr!r}: expected HOST:PORT, e.g. 0.0.0.0:9876 or [::]:9876")
    return host.strip("[]") or "0.0.0.0", int(port)


class HealthServer:
    """Serves the registry and the two checks on a background thread until ``close()``."""

    def __init__(
        self,
        addr: str,
        registry: CollectorRegistry,
        healthy: Check,
        ready: Check,
        status: Status | None = None,
    ) -> None:
        host, port = parse_addr(addr)
        server_self = self
        self.registry = registry
        self.healthy = healthy
        self.ready = ready

        class Handler(BaseHTTPRequestHandler):
            server_version = "sockops"
            sys_version = ""

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = generate_latest(server_self.registry)
                    except Exception as e:  # a scrape must not kill the server thread
                        log.error("scrape failed", extra={"fields": {"error": str(e)}})
                        self._send(500, b"scrape failed\n", "text/plain")
                        return
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/status" and status is not None:
                    body = json.dumps(status(), indent=1).encode()
                    self._send(200, body, "application/json")
                elif path in ("/healthz", "/readyz"):
                    ok, why = (server_self.healthy if path == "/healthz" else server_self.ready)()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: /metrics /healthz /readyz /status\n", "text/plain")

            def do_HEAD(self) -> None:
                self.do_GET()

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the agent's own log

        family_server = ThreadingHTTPServer
        if ":" in host:
            import socket

            class V6Server(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            family_server = V6Server
        self.server = family_server((host, port), Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address
        self._thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
