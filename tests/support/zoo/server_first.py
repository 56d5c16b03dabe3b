"""A server-first protocol (SMTP, MySQL, Redis AUTH banners) with a blocking client.

``python server_first.py server PORT``: sends a 64-byte greeting, reads a request to EOF, answers
with its sha256 and closes. ``python server_first.py client HOST PORT N``: N connections, each
reads the greeting, sends a request, half-closes with shutdown(SHUT_WR) and reads the answer to
EOF in a blocking recv() (no timeout: a spurious EAGAIN is an error). Prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading

GREETING = b"220 sockops zoo ready".ljust(64, b".")


def recv_all(s: socket.socket) -> bytes:
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    return buf


def handle(conn: socket.socket) -> None:
    with conn:
        conn.sendall(GREETING)
        conn.sendall(hashlib.sha256(recv_all(conn)).digest())


def server(port: int) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def one(host: str, port: int) -> bool:
    with socket.create_connection((host, port)) as s:
        s.settimeout(None)  # blocking, as most such clients are
        greeting = b""
        while len(greeting) < len(GREETING):
            part = s.recv(len(GREETING) - len(greeting))
            if not part:
                return False
            greeting += part
        request = os.urandom(1000)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        return greeting == GREETING and recv_all(s) == hashlib.sha256(request).digest()


def client(host: str, port: int, n: int) -> None:
    res: dict[str, object] = {"ok": 0, "mismatches": 0, "errors": []}
    for _ in range(n):
        try:
            key = "ok" if one(host, port) else "mismatches"
            res[key] = int(res[key]) + 1  # type: ignore[call-overload]
        except OSError as e:
            res["errors"].append(repr(e))  # type: ignore[union-attr]
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
