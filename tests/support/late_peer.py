"""Long-lived connections, opened and used before their pod is enabled, for late insertion tests.

Run inside a pod (stdlib only, any UID): ``python late_peer.py --connections N --holds K ...``.
Both ends of every connection live in this process, so every byte received is compared with the
byte sent at that position of the stream: a lost, duplicated or reordered byte is a mismatch.

Phases: ``--rounds`` round trips of ``--size`` bytes on every connection; then, ``--holds`` times:
print ``{"held": i}`` and wait for a line on stdin (the caller enables the pod and runs late
passes meanwhile), then make ``--rounds`` more round trips. With ``--backlog B`` the client end of
each connection also sends B bytes before the first hold that the server end reads only after
the first hold, and after the client sent more: at the first pass that direction still has
unread TCP bytes, and a switch made too early would deliver the newer bytes first. With
``--stream S`` the last phase instead streams for S seconds both ways at once (a sender and a
reader thread per direction, the sender up to 64 KiB ahead) while the caller runs passes, so a
switch happens with bytes in flight. The last stdout line is the JSON result.

``--connect`` dials another address than the listener (a service address a sidecar captures),
one connection at a time, so each accepted end belongs to the connection just dialled.

Sockets with a timeout (O_NONBLOCK files waiting in poll()), the event-loop style that late
insertion accepts; ``--blocking-server`` leaves the accepted ends blocking.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import threading
import time


class Direction:
    """One direction of one connection: every byte sent is kept until the receiver checks it."""

    def __init__(self, tx: socket.socket, rx: socket.socket) -> None:
        self.tx, self.rx = tx, rx
        self.unchecked = bytearray()  # sent, not yet received
        self.moved = self.mismatches = 0
        self.lock = threading.Lock()

    def send(self, n: int) -> None:
        data = os.urandom(n)
        with self.lock:
            self.unchecked += data
        self.tx.sendall(data)

    def receive(self, n: int, timeout_ms: int = 20000) -> None:
        poller = select.poll()
        poller.register(self.rx, select.POLLIN)
        got = 0
        while got < n:
            if not poller.poll(timeout_ms):
                raise TimeoutError(f"no data for {timeout_ms} ms after {got} of {n} bytes")
            try:
                part = self.rx.recv(n - got, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not part:
                raise EOFError(f"peer closed after {got} of {n} bytes")
            with self.lock:
                expected = bytes(self.unchecked[: len(part)])
                del self.unchecked[: len(part)]
            self.mismatches += part != expected
            self.moved += len(part)
            got += len(part)


def round_trips(pairs: list[tuple[Direction, Direction]], size: int, rounds: int) -> None:
    for _ in range(rounds):
        for up, down in pairs:
            up.send(size)
            up.receive(size)
            down.send(size)
            down.receive(size)


def stream(
    pairs: list[tuple[Direction, Direction]], size: int, seconds: float, window: int = 64 * 1024
) -> None:
    """Both directions of every connection at once, a sender and a reader thread for each: the
    sender runs up to ``window`` bytes ahead of its reader, so bytes are in flight at any moment."""
    errors: list[BaseException] = []
    end = time.monotonic() + seconds

    def send(d: Direction, done: threading.Event) -> None:
        try:
            while time.monotonic() < end:
                while len(d.unchecked) > window and not errors:
                    time.sleep(0.0005)
                d.send(size)
        except BaseException as e:  # reported in the result
            errors.append(e)
        finally:
            done.set()

    def receive(d: Direction, done: threading.Event) -> None:
        try:
            while not (done.is_set() and not d.unchecked):
                with d.lock:
                    n = min(len(d.unchecked), size)
                if n:
                    d.receive(n)
                else:
                    time.sleep(0.0005)
        except BaseException as e:
            errors.append(e)

    threads = []
    for pair in pairs:
        for d in pair:
            done = threading.Event()
            threads.append(threading.Thread(target=send, args=(d, done)))
            threads.append(threading.Thread(target=receive, args=(d, done)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--holds", type=int, default=1)
    p.add_argument("--backlog", type=int, default=0)
    p.add_argument("--stream", type=float, default=0.0)
    p.add_argument("--host", default="127.0.0.1", help="address the server ends listen on")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--connect", default="", help="HOST:PORT the client ends dial (default: the listener)")
    p.add_argument("--blocking-server", action="store_true")
    args = p.parse_args()

    listener = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    listener.bind((args.host, args.port))
    listener.listen(64)
    target = listener.getsockname()[:2]
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        target = (host, int(port))
    pairs = []
    for _ in range(args.connections):
        client = socket.create_connection(target, timeout=20)
        server, _ = listener.accept()
        server.settimeout(None if args.blocking_server else 20)
        pairs.append((Direction(client, server), Direction(server, client)))

    error = ""
    try:
        round_trips(pairs, args.size, args.rounds)
        for up, _ in pairs:
            if args.backlog:
                up.send(args.backlog)
        for i in range(args.holds):
            print(json.dumps({"held": i, "ports": [d.tx.getsockname()[1] for d, _ in pairs]}), flush=True)
            sys.stdin.readline()
            if i == 0 and args.backlog:
                # new bytes first: were they redirected too early, they would be read first
                for up, _ in pairs:
                    up.send(args.size)
                    up.receive(args.backlog + args.size)
            if args.stream and i == args.holds - 1:
                stream(pairs, args.size, args.stream)
            else:
                round_trips(pairs, args.size, args.rounds)
    except (OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
    moved = sum(d.moved for pair in pairs for d in pair)
    mismatches = sum(d.mismatches for pair in pairs for d in pair)
    unread = sum(len(d.unchecked) for pair in pairs for d in pair)
    for up, down in pairs:
        up.tx.close()
        down.tx.close()
    result = {"bytes": moved, "mismatches": mismatches, "unread": unread, "error": error}
    print(json.dumps(result), flush=True)
    return 0 if not (mismatches or unread or error) else 1


if __name__ == "__main__":
    sys.exit(main())
