"""A checking echo client whose connections use fixed source addresses, for collision tests.

Run inside a pod (stdlib only, any UID): ``python pinned_client.py HOST PORT --tag NAME ...``.
Speaks the protocol of ``lab.apps`` (8-byte big-endian length, then the bytes, echoed back).
Connection ``i`` binds ``--source-ip:--source-base+i`` before connecting, so two pods running the
same command produce connections with identical 4-tuples in two network namespaces (docs/DATAPLANE.md
F12). Every payload starts with ``--tag`` followed by random bytes; the client checks that the echo
is byte-for-byte what it sent, so a byte delivered to the other pod's socket shows up as a
mismatch, an error or a hang (bounded by the caller's timeout).

Phases: all connections are opened at once and each makes ``--requests`` requests; with ``--hold``
the client then prints ``{"held": [...local ports...]}`` and waits for a line on stdin with every
connection still open (the caller inspects the sockhash meanwhile); then each connection makes
``--requests`` more requests and closes. The last stdout line is the JSON result.

Sockets with a timeout (``--timeout``, default 60 s): an O_NONBLOCK file that waits in poll(),
the event-loop style sockops accelerates (blocking clients stay on plain TCP, docs/DATAPLANE.md,
"Who may be redirected to"). What these tests look for is a byte in the wrong place, which a
timeout does not hide.
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

HEADER = struct.Struct("!Q")
CHUNK = 256 * 1024


def request(sock: socket.socket, tag: bytes, size: int) -> bool:
    payload = tag + os.urandom(max(0, size - len(tag)))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(HEADER.pack(len(payload)))
            view = memoryview(payload)
            for off in range(0, len(payload), CHUNK):
                sock.sendall(view[off : off + CHUNK])
        except BaseException as e:
            errors.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    got = hashlib.sha256()
    head = b""
    remaining = len(payload)
    while remaining:
        data = sock.recv(min(remaining, CHUNK))
        if not data:
            raise EOFError(f"echo stopped after {len(payload) - remaining} of {len(payload)} bytes")
        if len(head) < len(tag):
            head += data[: len(tag) - len(head)]
        got.update(data)
        remaining -= len(data)
    sender.join()
    if errors:
        raise errors[0]
    if head != tag:
        raise ValueError(f"echo starts with {head!r}, expected this pod's tag {tag!r}")
    return got.digest() == hashlib.sha256(payload).digest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--tag", required=True)
    p.add_argument("--source-ip", default="127.0.0.1")
    p.add_argument("--source-base", type=int, default=41000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--size", type=int, default=256 * 1024)
    p.add_argument("--hold", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any one wait may take")
    args = p.parse_args()

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    tag = f"<{args.tag}>".encode()
    lock = threading.Lock()
    result: dict[str, object] = {"tag": args.tag, "requests": 0, "bytes": 0, "mismatches": 0, "errors": []}
    socks: list[socket.socket | None] = [None] * args.connections

    def record_error(i: int, e: BaseException) -> None:
        with lock:
            result["errors"].append(f"connection {i}: {e!r}")  # type: ignore[union-attr]

    def work(i: int) -> None:
        sock = socks[i]
        if sock is None:
            return
        try:
            for _ in range(args.requests):
                ok = request(sock, tag, args.size)
                with lock:
                    result["requests"] += 1  # type: ignore[operator]
                    result["bytes"] += args.size  # type: ignore[operator]
                    result["mismatches"] += 0 if ok else 1  # type: ignore[operator]
        except Exception as e:
            record_error(i, e)
            socks[i] = None
            sock.close()

    def connect(i: int) -> None:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(args.timeout)
        try:
            s.bind((args.source_ip, args.source_base + i))
            s.connect((args.host, args.port))
            socks[i] = s
        except Exception as e:
            s.close()
            record_error(i, e)

    def all_at_once(fn) -> None:
        threads = [threading.Thread(target=fn, args=(i,)) for i in range(args.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    all_at_once(connect)
    result["local"] = sorted(s.getsockname()[1] for s in socks if s is not None)
    all_at_once(work)
    if args.hold:
        print(json.dumps({"held": sorted(s.getsockname()[1] for s in socks if s is not None)}), flush=True)
        sys.stdin.readline()
        all_at_once(work)
    for s in socks:
        if s is not None:
            s.close()
    print(json.dumps(result), flush=True)
    return 0 if not result["errors"] and not result["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
