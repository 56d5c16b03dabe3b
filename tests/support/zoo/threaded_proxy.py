"""A thread-per-connection blocking TCP proxy, the Java/Python/Ruby way.

``python threaded_proxy.py LISTEN_PORT BACKEND_PORT``: for each accepted connection, connect to
127.0.0.1:BACKEND_PORT and run one thread per direction, each blocked in recv() on its source;
when a source reaches EOF, its thread half-closes the other socket with shutdown(SHUT_WR) while
the opposite thread may still be blocked in recv() on that very socket. Plain blocking sockets
without timeouts: a spurious EAGAIN ends the connection and is printed.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(256 * 1024):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError as e:
        print(f"proxy error: {e!r}", file=sys.stderr, flush=True)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def serve(down: socket.socket, backend_port: int) -> None:
    with down, socket.create_connection(("127.0.0.1", backend_port), timeout=None) as up:
        up.settimeout(None)
        t = threading.Thread(target=pump, args=(up, down))
        t.start()
        pump(down, up)
        t.join()


def main() -> None:
    listen_port, backend_port = int(sys.argv[1]), int(sys.argv[2])
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", listen_port))
    ls.listen(128)
    print("listening", flush=True)
    while True:
        down, _ = ls.accept()
        threading.Thread(target=serve, args=(down, backend_port), daemon=True).start()


if __name__ == "__main__":
    main()
