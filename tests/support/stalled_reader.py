"""One connection whose reader stops reading while its sender keeps writing (the queue budget).

Run inside a pod (stdlib only, any UID): ``python stalled_reader.py --total BYTES [--hold]``.
Both ends live in this process, both files O_NONBLOCK (an event loop, the only kind of client
sockops accelerates); the server end is accepted before the client sends, so the connection is
paired from its first byte (a first connection proves the reader: reader_proof.py). The process
names itself ``stalled-sender`` (prctl), so whoever reports the sending program can be checked
against it.

Phase 1, stalled: the client writes random bytes until a send would block and stays blocked for
``--stall-ms`` (backpressure), or until ``--total`` bytes were accepted. It prints
``{"pid", "comm", "accepted", "backpressure"}``: ``accepted`` is what the kernel took while nobody
read. With ``--hold`` it then waits for a line on stdin (the caller looks at maps, metrics,
status meanwhile).

Phase 2, resumed: the reader reads everything while the client writes the rest of ``--total``.
The last line is ``{"sent", "received", "sha_sent", "sha_received"}``: every byte in order iff the
two digests are equal.
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
import time

CHUNK = 65536
COMM = b"stalled-sender"
PR_SET_NAME = 15


class Sender:
    """The client end: writes random bytes, hashing exactly what the kernel accepted."""

    def __init__(self, sock: socket.socket, total: int) -> None:
        self.sock = sock
        self.total = total
        self.sent = 0
        self.digest = hashlib.sha256()
        self._buf = b""

    def write_some(self) -> bool:
        """Send until the kernel refuses; False when a send would block (or all is sent)."""
        while self.sent < self.total:
            if not self._buf:
                self._buf = os.urandom(min(CHUNK, self.total - self.sent))
            try:
                n = self.sock.send(self._buf)
            except BlockingIOError:
                return False
            self.digest.update(self._buf[:n])
            self._buf = self._buf[n:]
            self.sent += n
        return False


def stall(sender: Sender, stall_ms: int) -> bool:
    """Write with nobody reading; True when the sender was held back for ``stall_ms``."""
    poller = select.poll()
    poller.register(sender.sock, select.POLLOUT)
    while sender.sent < sender.total:
        sender.write_some()
        if sender.sent >= sender.total:
            return False
        if not poller.poll(stall_ms):
            return True
    return False


def resume(sender: Sender, reader: socket.socket, deadline: float) -> tuple[int, str]:
    """Read everything while the rest is written; (bytes received, their sha256)."""
    got = hashlib.sha256()
    received = 0
    poller = select.poll()
    poller.register(reader, select.POLLIN)
    poller.register(sender.sock, select.POLLOUT)
    while received < sender.total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"received {received} of {sender.total} bytes before the deadline")
        if sender.sent >= sender.total:
            poller.modify(sender.sock, 0)
        for fd, _ in poller.poll(1000):
            if fd == sender.sock.fileno():
                sender.write_some()
                continue
            try:
                part = reader.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not part:
                raise EOFError(f"peer closed after {received} bytes")
            got.update(part)
            received += len(part)
    return received, got.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=64 << 20)
    ap.add_argument("--stall-ms", type=int, default=1000)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(COMM), 0, 0, 0)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    from reader_proof import prove  # run as a script: its directory is on sys.path

    prove(listener)
    client = socket.socket()
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        client.connect(listener.getsockname())
    server, _ = listener.accept()  # joined the sockhash before the client's first send
    server.setblocking(False)
    select.select([], [client], [], 10)

    sender = Sender(client, args.total)
    held = stall(sender, args.stall_ms)
    stalled = {"pid": os.getpid(), "comm": COMM.decode(), "accepted": sender.sent, "backpressure": held}
    print(json.dumps(stalled), flush=True)
    if args.hold:
        sys.stdin.readline()
    received, sha = resume(sender, server, time.monotonic() + args.timeout)
    print(
        json.dumps(
            {
                "sent": sender.sent,
                "received": received,
                "sha_sent": sender.digest.hexdigest(),
                "sha_received": sha,
            }
        ),
        flush=True,
    )
    for s in (client, server, listener):
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
