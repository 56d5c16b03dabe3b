"""Connections whose both ends live in this process, for exact byte and miss accounting.

Run inside a pod (stdlib only, any UID): ``python pair_traffic.py --connections N --size S
--rounds R [--hold]``. Each connection is accepted before its client sends anything, so the
server end has joined the sockhash (PASSIVE_ESTABLISHED runs before accept() can return it) and
the client's first message always pairs: no connection is left on TCP by the start-up race, and
the bytes redirected are exactly ``connections * rounds * 2 * size`` per phase (one message of
``size`` bytes each way per round, no framing). A first connection proves the reader
(reader_proof.py); it is not counted.

Phases: ``--rounds`` round trips on every connection; with ``--hold`` the script prints
``{"held": [client ports]}`` and waits for a line on stdin with every connection open (the caller
scrapes metrics or edits the sockhash meanwhile), then makes ``--rounds`` more round trips. The
last stdout line is ``{"bytes": ..., "messages": ..., "mismatches": ...}`` (per direction sums).

Reads wait in poll() and then recv(MSG_DONTWAIT), as an event loop (Envoy) does, so bytes that
come back over TCP to a socket that still has a psock (the miss case) are read normally instead
of hitting the blocking-reader EAGAIN of docs/KERNEL-NOTES.md §1.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys

from reader_proof import prove


def recv_exact(sock: socket.socket, n: int, timeout_ms: int = 20000) -> bytes:
    buf = bytearray()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while len(buf) < n:
        if not poller.poll(timeout_ms):
            raise TimeoutError(f"no data for {timeout_ms} ms after {len(buf)} of {n} bytes")
        try:
            part = sock.recv(n - len(buf), socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if not part:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)


def round_trips(pairs: list[tuple[socket.socket, socket.socket]], size: int, rounds: int) -> tuple[int, int]:
    """``rounds`` request/echo exchanges on every pair; returns (bytes moved, mismatches)."""
    moved = mismatches = 0
    for _ in range(rounds):
        for client, server in pairs:
            payload = os.urandom(size)
            client.sendall(payload)
            got = recv_exact(server, size)
            server.sendall(got)
            back = recv_exact(client, size)
            moved += 2 * size
            mismatches += got != payload or back != payload
    return moved, mismatches


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--hold", action="store_true")
    args = p.parse_args()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    prove(listener)
    pairs = []
    for _ in range(args.connections):
        # a timeout makes the client's file O_NONBLOCK: only such clients are accelerated
        client = socket.create_connection(listener.getsockname(), timeout=20)
        server, _ = listener.accept()
        pairs.append((client, server))

    moved, mismatches = round_trips(pairs, args.size, args.rounds)
    messages = 2 * args.connections * args.rounds
    if args.hold:
        print(json.dumps({"held": [c.getsockname()[1] for c, _ in pairs], "bytes": moved}), flush=True)
        sys.stdin.readline()
        more, bad = round_trips(pairs, args.size, args.rounds)
        moved += more
        mismatches += bad
        messages *= 2
    for client, server in pairs:
        client.close()
        server.close()
    print(json.dumps({"bytes": moved, "messages": messages, "mismatches": mismatches}), flush=True)
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
