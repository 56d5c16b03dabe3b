"""Programs with known socket styles that hold their connections open, for observe mode's tests.

Run inside a pod (stdlib only, any UID). Each renames itself (``--name``, /proc/PID/comm) so the
report can be checked per program, prints one JSON line once its sockets exist, then holds them
until stdin closes or ``--hold`` seconds pass (bounded, so nothing outlives a failed test):

* ``server --port P``: thread-per-connection with plain blocking sockets (the accepted sockets
  are blocking: sockops' "blocking server end");
* ``evserver --port P``: asyncio, whose accepted sockets are O_NONBLOCK;
* ``client --port P --style blocking|timeout|asyncio --connections N``: N connections to
  127.0.0.1:P; ``blocking`` has no timeout (a blocking file), ``timeout`` makes CPython set
  O_NONBLOCK and wait in poll(), ``asyncio`` is an event loop.

Each connection sends one byte, so both ends are established and have seen data.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import select
import socket
import sys
import threading

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def say(doc: dict[str, object]) -> None:
    print(json.dumps(doc), flush=True)


def hold(seconds: float) -> None:
    """Until stdin closes (the test is done) or ``seconds`` pass."""
    select.select([sys.stdin], [], [], seconds)


def server(port: int, seconds: float) -> None:
    conns: list[socket.socket] = []
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            conns.append(conn)
            conn.recv(1)

    threading.Thread(target=accept, daemon=True).start()
    say({"listening": port})
    hold(seconds)


async def evserver(port: int, seconds: float) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(1)

    srv = await asyncio.start_server(on_conn, "127.0.0.1", port)
    say({"listening": port})
    async with srv:
        await asyncio.get_running_loop().run_in_executor(None, hold, seconds)


async def aclients(port: int, n: int, seconds: float) -> None:
    writers = []
    for _ in range(n):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x")
        await w.drain()
        writers.append(w)
    say({"connected": n})
    await asyncio.get_running_loop().run_in_executor(None, hold, seconds)


def clients(port: int, n: int, style: str, seconds: float) -> None:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=None if style == "blocking" else 30.0)
        s.sendall(b"x")
        socks.append(s)
    say({"connected": n})
    hold(seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=("server", "evserver", "client"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--style", choices=("blocking", "timeout", "asyncio"), default="blocking")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--hold", type=float, default=120.0)
    args = p.parse_args()
    set_comm(args.name)
    if args.role == "server":
        server(args.port, args.hold)
    elif args.role == "evserver":
        asyncio.run(evserver(args.port, args.hold))
    elif args.style == "asyncio":
        asyncio.run(aclients(args.port, args.connections, args.hold))
    else:
        clients(args.port, args.connections, args.style, args.hold)


if __name__ == "__main__":
    main()
