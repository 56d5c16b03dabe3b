"""A half-closing echo client: connect, send one request, shutdown(SHUT_WR), read until EOF.

Run inside a pod (stdlib only, any UID): ``python halfclose_client.py HOST PORT --connections N
--rounds R --sizes 1,1000``. Speaks the lab.apps protocol (8-byte length, then the bytes); the
echo server replies and closes when it reads EOF. ``N`` threads each make ``R`` connections, one
request per connection. This is the pattern of HTTP/1.0 clients, ``nc -N`` and many RPC tools; on
plain blocking sockets (no timeout, so CPython does not retry EAGAIN) it is the case where a
reader blocked in recv() on a socket with a psock can be woken without data (docs/DATAPLANE.md F13).

Prints one JSON line: ok / mismatches counts and errors by exception type.
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


def one(host: str, port: int, size: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect((host, port))
        payload = os.urandom(size)
        s.sendall(struct.pack("!Q", size) + payload)
        s.shutdown(socket.SHUT_WR)
        got, n = hashlib.sha256(), 0
        while True:
            data = s.recv(65536)
            if not data:
                break
            got.update(data)
            n += len(data)
        return n == size and got.digest() == hashlib.sha256(payload).digest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--sizes", default="1,1000")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    result: dict[str, object] = {"ok": 0, "mismatches": 0, "errors": {}}
    lock = threading.Lock()

    def worker(i: int) -> None:
        for r in range(args.rounds):
            try:
                ok = one(args.host, args.port, sizes[(i + r) % len(sizes)])
                with lock:
                    result["ok" if ok else "mismatches"] += 1  # type: ignore[operator]
            except Exception as e:
                with lock:
                    errors: dict[str, int] = result["errors"]  # type: ignore[assignment]
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(result), flush=True)
    return 0 if not result["errors"] and not result["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
