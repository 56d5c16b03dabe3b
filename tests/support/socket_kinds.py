"""Sockets that sockops must never give a psock, each with its own content check.

Run inside a pod (stdlib only, any UID): ``python socket_kinds.py KIND --connections N``. A server
thread listens on 127.0.0.1, N client connections of the kind run against it, and one JSON line
says how many came back intact (``ok``), wrong (``mismatches``) and which errors were raised.
Plain blocking sockets without timeouts: CPython would retry a spurious EAGAIN behind a timeout,
and here it must show as an error. ``--event-wait`` gives the clients a timeout instead (an
O_NONBLOCK file that waits in poll(): the event-loop style sockops accelerates).

Kinds:
* ``mptcp``: client and server are IPPROTO_MPTCP sockets; the kernel's TCP subflows under them
  run sock_ops like any TCP socket, but the MPTCP socket reads them directly, never a psock queue.
* ``fastopen``: the request rides on the SYN (TCP Fast Open, MSG_FASTOPEN, no cookie needed:
  the caller sets net.ipv4.tcp_fastopen in the pod); those bytes crossed TCP before any psock.
* ``fin-first``: the client connects, half-closes at once without sending, and reads the reply
  until EOF; the server answers only after the client's FIN, a moment later, so the client's
  blocking recv() sees the bare ACK of its FIN first (the EAGAIN trigger of docs/KERNEL-NOTES.md §1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

IPPROTO_MPTCP = 262
MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN = 23
REPLY_DELAY = 0.05  # longer than the delayed-ACK timer, so the FIN's ACK goes out alone


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def recv_all(s: socket.socket) -> bytes:
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    return buf


def payload(i: int, size: int) -> bytes:
    seed = hashlib.sha256(f"request {i}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def serve(listener: socket.socket, kind: str) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn, kind), daemon=True).start()


def handle(conn: socket.socket, kind: str) -> None:
    with conn:
        if kind == "fin-first":
            got = recv_all(conn)  # nothing, then EOF
            time.sleep(REPLY_DELAY)
            conn.sendall(hashlib.sha256(got).digest())
            return
        (size,) = struct.unpack("!Q", recv_exact(conn, 8))
        conn.sendall(hashlib.sha256(recv_exact(conn, size)).digest())


def client(kind: str, port: int, i: int, size: int, timeout: float | None) -> bool:
    proto = IPPROTO_MPTCP if kind == "mptcp" else 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as s:
        s.settimeout(timeout)
        if kind == "fin-first":
            s.connect(("127.0.0.1", port))
            s.shutdown(socket.SHUT_WR)
            return recv_all(s) == hashlib.sha256(b"").digest()
        data = payload(i, size)
        request = struct.pack("!Q", size) + data
        if kind == "fastopen":
            sent = s.sendto(request, MSG_FASTOPEN, ("127.0.0.1", port))
            s.sendall(request[sent:])
        else:
            s.connect(("127.0.0.1", port))
            s.sendall(request)
        return recv_exact(s, 32) == hashlib.sha256(data).digest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["mptcp", "fastopen", "fin-first"])
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--event-wait", action="store_true", help="client sockets with a timeout")
    args = p.parse_args()

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if args.kind == "mptcp" else 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.kind == "fastopen":
        listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 64)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    threading.Thread(target=serve, args=(listener, args.kind), daemon=True).start()

    result: dict[str, Any] = {"ok": 0, "mismatches": 0, "errors": {}}
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(t, args.connections, args.threads):
            try:
                ok = client(args.kind, port, i, args.size, 20.0 if args.event_wait else None)
                with lock:
                    result["ok" if ok else "mismatches"] += 1
            except Exception as e:
                with lock:
                    name = type(e).__name__
                    result["errors"][name] = result["errors"].get(name, 0) + 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
