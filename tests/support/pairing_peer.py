"""The checking peers of tests/test_pairing.py: servers that may speak first, and a client that
runs a plan of connections whose sockets share source ports, each socket owned by the UID of the
process it stands for (the app, UID 1000, or Envoy, UID 1337).

Why a plan runner and not one process per socket: the cases are about *which* sockets exist at
once (an Envoy upstream that waits for a server's greeting while an app connection leaves from
the same pod IP and port), so one process must open them with exact timing. It runs as root and
creates each socket with the file-system UID of the role it plays (setfsuid() in that thread
only): the socket's owner, which Istio's ``-m owner --uid-owner 1337`` rules match, is the fsuid
at creation (the socket file's credentials), so the capture rules treat it exactly like a socket
of that process.

Protocol, one exchange per connection:
  server -> client  (server-first listeners only) ``greet`` bytes of greeting(label), after a delay
  client -> server  header (magic, connection id, request and response sizes, server label),
                    then ``req`` bytes of stream(id, "req")
  server -> client  ``resp`` bytes of stream(id, "resp"), then sha256 of the request as received,
                    then FIN (the server half-closes first, so TIME_WAIT stays on its side)
  client -> server  FIN after it read the response and the server's FIN
Both ends read to EOF at the end: a byte of another connection that arrives after the exchange
is counted as ``extra_bytes``, not missed. Every stream is position-dependent (SHAKE-256 of the
connection id), so a lost, duplicated or foreign byte shows as a mismatch, and the server refuses
a header that names another server (a wrong delivery).

  pairing_peer.py server SPEC_JSON       SPEC: [{"label", "host", "port", "greet", "greet_delay_ms"}]
      prints {"listening": [...]}, then one JSON line per finished connection, until SIGTERM
  pairing_peer.py client < PLAN_JSON     PLAN on stdin (it can be large): {"parallel": P,
      "stop_after_failures": F, "groups": [[conn, ...], ...]}; conn: {"id", "uid", "family",
      "bind", "dest", "server", "greet", "start_ms", "pre_send_ms", "req", "resp", "timeout"}
      the groups run P at a time, the connections of a group at once (each from its start_ms);
      prints one JSON line: {"results": [{"id", "ok", "error", "local", "sent", "got"}, ...]}
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

MAGIC = b"PAIR"
HEADER = struct.Struct("!4sQQQ16s")  # magic, connection id, request size, response size, label
DIGEST = 32


def stream(conn: int, what: str, size: int) -> bytes:
    """The first ``size`` bytes of a connection's request ("req") or response ("resp") stream."""
    return hashlib.shake_256(f"{what}|{conn}".encode()).digest(size) if size else b""


def greeting(label: str, size: int) -> bytes:
    """What a server-first listener says before it reads anything."""
    return hashlib.shake_256(f"greet|{label}".encode()).digest(size) if size else b""


def header(conn: int, req: int, resp: int, server: str) -> bytes:
    return HEADER.pack(MAGIC, conn, req, resp, server.encode()[:16])


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer if the peer closed first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def drain(sock: socket.socket) -> int:
    """Read to EOF; the number of bytes that came (0 for a clean end)."""
    extra = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return extra
        extra += len(chunk)


# -- server --------------------------------------------------------------------------------------


def serve_one(conn_sock: socket.socket, spec: dict[str, Any], out: threading.Lock) -> None:
    label = spec["label"]
    rec: dict[str, Any] = {"server": label, "conn": None, "digest": None, "errors": []}
    try:
        rec["peer"] = list(conn_sock.getpeername()[:2])
        conn_sock.settimeout(spec.get("timeout", 20.0))
        if spec.get("greet"):
            time.sleep(spec.get("greet_delay_ms", 0) / 1000)
            conn_sock.sendall(greeting(label, spec["greet"]))
        raw = recv_exact(conn_sock, HEADER.size)
        if len(raw) < HEADER.size:
            rec["errors"].append("header_short")
            rec["head"] = raw[:32].hex()
            return
        magic, conn, req, resp, named = HEADER.unpack(raw)
        if magic == MAGIC:
            rec["claimed"] = conn  # whose header it is, even when it arrived at the wrong server
        if magic != MAGIC or named.rstrip(b"\0").decode(errors="replace") != label:
            rec["errors"].append("wrong_delivery")  # another connection's or server's bytes
            rec["head"] = raw.hex()
            rec["named"] = named.rstrip(b"\0").decode(errors="replace")
            rec["extra"] = len(raw) + drain(conn_sock)
            return
        rec["conn"] = conn
        body = recv_exact(conn_sock, req)
        rec["digest"] = hashlib.sha256(body).hexdigest()
        if body != stream(conn, "req", req):
            rec["errors"].append("request_mismatch" if len(body) == req else "request_short")
            rec["head"] = body[:64].hex()
            return
        conn_sock.sendall(stream(conn, "resp", resp) + hashlib.sha256(body).digest())
        conn_sock.shutdown(socket.SHUT_WR)
        extra = drain(conn_sock)
        if extra:
            rec["errors"].append("extra_bytes")
            rec["extra"] = extra
    except OSError as e:
        rec["errors"].append(e.__class__.__name__)
    finally:
        conn_sock.close()
        with out:
            sys.stdout.write(json.dumps(rec) + "\n")
            sys.stdout.flush()


def server_main(specs: list[dict[str, Any]]) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = threading.Lock()
    sel = selectors.DefaultSelector()
    for spec in specs:
        family = socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" without v6only is the dual-stack listener (IPv4 clients arrive v4-mapped).
            lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.get("v6only", False)))
        lsock.bind((spec["host"], spec["port"]))
        lsock.listen(1024)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ, spec)
    print(json.dumps({"listening": [s["label"] for s in specs]}), flush=True)
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            try:
                conn_sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            conn_sock.setblocking(True)
            threading.Thread(target=serve_one, args=(conn_sock, key.data, out), daemon=True).start()
    time.sleep(0.3)  # let running exchanges print their lines
    return 0


# -- client --------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def make_socket(family: int, uid: int) -> socket.socket:
    """A TCP socket owned by ``uid`` (see the module doc): setfsuid() affects this thread only."""
    if os.geteuid() != 0 or uid == 0:
        return socket.socket(family, socket.SOCK_STREAM)
    _libc.setfsuid(uid)
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    finally:
        _libc.setfsuid(0)


def run_conn(c: dict[str, Any], t0: float) -> dict[str, Any]:
    res: dict[str, Any] = {"id": c["id"], "ok": False, "error": None, "local": None}
    req_bytes = stream(c["id"], "req", c["req"])
    res["sent"] = hashlib.sha256(req_bytes).hexdigest()
    delay = t0 + c.get("start_ms", 0) / 1000 - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    family = socket.AF_INET6 if c.get("family") == 6 else socket.AF_INET
    step = "socket"
    try:
        s = make_socket(family, c["uid"])
    except OSError as e:
        res["error"] = f"socket:{e.__class__.__name__}"
        return res
    try:
        s.settimeout(c.get("timeout", 10.0))
        if c.get("bind"):
            step = "bind"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(tuple(c["bind"]))
        step = "connect"
        s.connect(tuple(c["dest"]))
        res["local"] = list(s.getsockname()[:2])
        if c.get("greet"):
            step = "greeting"
            got = recv_exact(s, c["greet"])
            if got != greeting(c["server"], c["greet"]):
                res["error"] = "greeting_mismatch" if len(got) == c["greet"] else "greeting_short"
                res["got"] = got[:64].hex()
                return res
        if c.get("pre_send_ms"):
            time.sleep(c["pre_send_ms"] / 1000)
        step = "send"
        s.sendall(header(c["id"], c["req"], c["resp"], c["server"]) + req_bytes)
        step = "response"
        got = recv_exact(s, c["resp"])
        if got != stream(c["id"], "resp", c["resp"]):
            res["error"] = "response_mismatch" if len(got) == c["resp"] else "response_short"
            res["got"] = got[:64].hex()
            return res
        step = "digest"
        digest = recv_exact(s, DIGEST)
        if digest != hashlib.sha256(req_bytes).digest():
            res["error"] = "digest_mismatch" if len(digest) == DIGEST else "digest_short"
            res["got"] = digest.hex()
            return res
        step = "eof"
        extra = drain(s)
        if extra:
            res["error"] = "extra_bytes"
            res["extra"] = extra
            return res
        res["ok"] = True
    except OSError as e:
        res["error"] = f"{step}:{'timeout' if isinstance(e, TimeoutError) else e.__class__.__name__}"
    finally:
        s.close()
    return res


def client_main(plan: dict[str, Any]) -> int:
    groups: list[list[dict[str, Any]]] = plan["groups"]
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    failed_groups = [0]
    next_group = [0]
    stop_after = plan.get("stop_after_failures", 0)

    def run_group(group: list[dict[str, Any]]) -> None:
        t0 = time.monotonic()
        out: list[dict[str, Any]] = [{} for _ in group]

        def one(i: int) -> None:
            out[i] = run_conn(group[i], t0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(group))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with lock:
            results.extend(out)
            if not all(r.get("ok") for r in out):
                failed_groups[0] += 1

    def worker() -> None:
        while True:
            with lock:
                if next_group[0] >= len(groups) or (stop_after and failed_groups[0] >= stop_after):
                    return
                group = groups[next_group[0]]
                next_group[0] += 1
            run_group(group)

    workers = [threading.Thread(target=worker) for _ in range(max(1, plan.get("parallel", 1)))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps({"results": results, "groups_run": next_group[0]}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"] and len(sys.argv) == 3:
        sys.exit(server_main(json.loads(sys.argv[2])))
    if sys.argv[1:] == ["client"]:
        sys.exit(client_main(json.load(sys.stdin)))
    sys.exit("usage: pairing_peer.py server SPEC_JSON | client < PLAN_JSON")
