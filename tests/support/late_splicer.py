"""A program that reads its connections with recv() and then splices one: the one I/O style the
reader hook cannot foresee, because its port is proven by then (docs/DATAPLANE.md, "Splice
readers"; tests/test_apps.py, the breaker).

Run inside a pod (stdlib only, any UID):

* ``python late_splicer.py server PORT``: a thread per connection, blocking sockets. Commands are
  lines read one byte at a time with recv(), so a command never consumes the bytes after it:
  ``PING`` answers ``PONG``; ``RECV n`` and ``SPLICE n`` read n bytes (with recv(), or with
  splice() into a pipe after a 200 ms pause, so bytes sent right behind the command are already
  queued) and answer the sha256 of what they read. The process names itself ``late-splicer``.
* ``python late_splicer.py client HOST PORT --mode recv|splice``: an O_NONBLOCK client (the kind
  sockops accelerates) that ping-pongs for ``--warm-ms``, then sends the command and its payload
  in one go, and waits up to ``--timeout`` for the digest. Prints ``{"pings", "intact", "hung"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import select
import socket
import sys
import threading
import time

PR_SET_NAME = 15


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            raise EOFError
        line += b
    return line.strip()


def read_n(sock: socket.socket, n: int, splice: bool) -> bytes:
    if not splice:
        out = b""
        while len(out) < n:
            b = sock.recv(n - len(out))
            if not b:
                raise EOFError
            out += b
        return out
    time.sleep(0.2)
    r, w = os.pipe()
    try:
        out = b""
        while len(out) < n:
            moved = os.splice(sock.fileno(), w, n - len(out))
            if not moved:
                raise EOFError
            while moved:
                b = os.read(r, moved)
                out += b
                moved -= len(b)
        return out
    finally:
        os.close(r)
        os.close(w)


def serve(conn: socket.socket) -> None:
    with contextlib.suppress(EOFError, OSError), conn:
        while True:
            cmd = read_line(conn)
            if cmd == b"PING":
                conn.sendall(b"PONG\n")
                continue
            verb, n = cmd.split()
            data = read_n(conn, int(n), verb == b"SPLICE")
            conn.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n")


def server(port: int) -> None:
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_NAME, b"late-splicer", 0, 0, 0)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(64)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class Client:
    """A non-blocking client with one deadline for the whole run."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setblocking(False)
        self.buf = b""

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def send(self, data: bytes) -> None:
        while data:
            select.select([], [self.sock], [], self.left())
            with contextlib.suppress(BlockingIOError):
                data = data[self.sock.send(data) :]

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            select.select([self.sock], [], [], self.left())
            with contextlib.suppress(BlockingIOError):
                b = self.sock.recv(65536)
                if not b:
                    raise EOFError
                self.buf += b
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def client(host: str, port: int, mode: str, warm_ms: int, payload: int, timeout: float) -> dict[str, object]:
    c = Client(host, port, timeout)
    pings = 0
    try:
        warm_until = time.monotonic() + warm_ms / 1000
        while time.monotonic() < warm_until:
            c.send(b"PING\n")
            assert c.line() == b"PONG"
            pings += 1
            time.sleep(0.01)
        data = os.urandom(payload)
        c.send(f"{mode.upper()} {payload}\n".encode() + data)
        intact = c.line().decode() == hashlib.sha256(data).hexdigest()
        return {"pings": pings, "intact": intact, "hung": False}
    except (TimeoutError, EOFError, OSError) as e:
        return {"pings": pings, "intact": False, "hung": isinstance(e, TimeoutError), "error": repr(e)}
    finally:
        c.sock.close()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--mode", choices=("recv", "splice"), default="recv")
    c.add_argument("--warm-ms", type=int, default=600)
    c.add_argument("--payload", type=int, default=65536)
    c.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args()
    if a.role == "server":
        server(a.port)
        return
    print(json.dumps(client(a.host, a.port, a.mode, a.warm_ms, a.payload, a.timeout)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
