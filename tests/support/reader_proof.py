"""What a test program does before its measured connections, so that they are accelerated.

sock_ops gives a socket a psock only once its program has shown how it reads: a server's port
once a connection of it was read with recv(), a serving program's client sockets once one of them
was (docs/DATAPLANE.md, "Splice readers"). A program that both listens and connects (the support
scripts here keep both ends in one process) proves both on one first connection, each end reading
a byte. That connection may itself be plain TCP. Stdlib only: imported by the scripts next to it.
"""

from __future__ import annotations

import socket


def prove(listener: socket.socket, timeout: float = 10.0) -> None:
    """One connection to ``listener`` (already listening) on which each end reads a byte."""
    with socket.create_connection(listener.getsockname()[:2], timeout=timeout) as client:
        server, _ = listener.accept()
        with server:
            server.settimeout(timeout)
            client.sendall(b"?")
            if server.recv(1) != b"?":
                raise RuntimeError("the proof connection's request did not arrive")
            server.sendall(b"!")
            if client.recv(1) != b"!":
                raise RuntimeError("the proof connection's answer did not arrive")
