"""Traffic for the demo, tests and benchmarks: an echo server and a checking client.

Run inside a pod as ``python -m lab.apps server|client ...``. The protocol is a stream of
requests, each an 8-byte big-endian length followed by that many bytes; the server echoes the
bytes back as they arrive. The client sends from one thread and reads from another, so a large
payload exercises backpressure in both directions, and compares the sha256 of what it sent with
what came back.

The server is thread-per-connection with plain blocking sockets (the classic request/response
server). The client's sockets have a timeout by default, which makes CPython put the file in
O_NONBLOCK and wait in poll() before each read: the event-loop style of Envoy, Go or asyncio,
which sockops accelerates. ``--blocking`` gives the client plain blocking sockets without
timeouts instead: a blocking reader, which sockops leaves on plain TCP (docs/DATAPLANE.md, "Who
may be redirected to"), and whose spurious EAGAIN would reach the client as an error (CPython
retries EAGAIN only on sockets with a timeout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HEADER = struct.Struct("!Q")
CHUNK = 256 * 1024


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def _serve_conn(conn: socket.socket) -> None:
    with conn:
        try:
            while True:
                head = conn.recv(HEADER.size, socket.MSG_WAITALL)
                if len(head) < HEADER.size:
                    return
                (remaining,) = HEADER.unpack(head)
                while remaining:
                    data = conn.recv(min(remaining, CHUNK))
                    if not data:
                        return
                    conn.sendall(data)
                    remaining -= len(data)
        except OSError as e:
            print(json.dumps({"server_error": repr(e)}), file=sys.stderr, flush=True)


def serve(host: str, port: int, family: int) -> None:
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1024)
    print(json.dumps({"listening": [host, port]}), flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def _one_request(sock: socket.socket, size: int) -> tuple[bool, float]:
    """Send `size` random bytes, read the echo; returns (intact, seconds)."""
    payload = os.urandom(size)
    sent_digest = hashlib.sha256(payload).hexdigest()
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            sock.sendall(HEADER.pack(size))
            view = memoryview(payload)
            for off in range(0, size, CHUNK):
                sock.sendall(view[off : off + CHUNK])
        except BaseException as e:  # reported by the caller
            errors.append(e)

    start = time.perf_counter()
    if size <= CHUNK:
        sender()
    else:
        t = threading.Thread(target=sender)
        t.start()
    got = hashlib.sha256()
    remaining = size
    while remaining:
        data = sock.recv(min(remaining, CHUNK))
        if not data:
            raise EOFError(f"echo stopped after {size - remaining} of {size} bytes")
        got.update(data)
        remaining -= len(data)
    elapsed = time.perf_counter() - start
    if size > CHUNK:
        t.join()
    if errors:
        raise errors[0]
    return got.hexdigest() == sent_digest, elapsed


def run_client(args: argparse.Namespace) -> dict[str, object]:
    sizes = [int(s) for s in args.sizes.split(",")]
    latencies: list[float] = []
    lock = threading.Lock()
    result = {"connections": args.connections, "requests": 0, "bytes": 0, "mismatches": 0, "errors": []}

    def worker(i: int) -> None:
        try:
            timeout = None if args.blocking else args.timeout
            with socket.create_connection((args.host, args.port), timeout=timeout) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hold_until = time.monotonic() + args.hold if args.hold else None
                n = 0
                while n < args.requests or (hold_until is not None and time.monotonic() < hold_until):
                    size = sizes[(i + n) % len(sizes)]
                    n += 1
                    ok, secs = _one_request(sock, size)
                    with lock:
                        result["requests"] += 1
                        result["bytes"] += size
                        result["mismatches"] += 0 if ok else 1
                        latencies.append(secs)
        except Exception as e:
            with lock:
                result["errors"].append(f"connection {i}: {e!r}")

    deadline = time.monotonic() + args.duration if args.duration else None
    rounds = 0
    with ThreadPoolExecutor(max_workers=args.connections) as pool:
        while True:
            list(pool.map(worker, range(args.connections)))
            rounds += 1
            if deadline is None or time.monotonic() >= deadline:
                break
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e6 if latencies else 0.0

    result["p50_us"] = round(pct(0.50), 1)
    result["p99_us"] = round(pct(0.99), 1)
    result["rounds"] = rounds
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.apps", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="echo server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--ipv6", action="store_true")
    c = sub.add_parser("client", help="checking client; prints one JSON line")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=8080)
    c.add_argument("--connections", type=int, default=4)
    c.add_argument("--requests", type=int, default=10, help="requests per connection")
    c.add_argument("--sizes", default="1024", help="comma-separated payload sizes in bytes")
    c.add_argument("--duration", type=float, default=0.0, help="repeat rounds until this many seconds")
    c.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="keep each connection making requests for this many seconds (one long-lived connection)",
    )
    c.add_argument(
        "--blocking",
        action="store_true",
        help="plain blocking sockets (a blocking reader) instead of event-wait ones",
    )
    c.add_argument("--timeout", type=float, default=120.0, help="seconds any one wait may take")
    args = p.parse_args(argv)
    if args.cmd == "server":
        serve(args.host, args.port, socket.AF_INET6 if args.ipv6 else socket.AF_INET)
        return 0
    out = run_client(args)
    print(json.dumps(out), flush=True)
    return 0 if not out["errors"] and not out["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
