"""scapy inside a pod: capture what crosses the pod's interfaces, or send crafted packets.

Run as root inside the pod's netns (``Pod.popen``), with the test's interpreter (scapy comes from
the venv). Two commands:

``sniff --ifaces lo,eth0 --ports 8080,15001,15006``
    Starts an AsyncSniffer on every interface, prints ``{"ready": true}`` once the capture
    sockets are open, captures until a line arrives on stdin, then prints one JSON line with, per
    interface, the TCP segments on those ports: SYN, FIN and RST counts, and how many segments
    carried payload and how many payload bytes. That is how the tests show that an accelerated
    connection puts its handshake and teardown on the wire but not its bytes.

``craft --spec JSON``
    Sends the packets described by the JSON list (``{"src", "dst", "sport", "dport", "flags",
    "count"}`` each) at layer 3 and prints ``{"sent": N}``: spoofed SYNs and RSTs from another
    pod in the isolation tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from typing import Any


def sniff(ifaces: list[str], ports: set[int]) -> int:
    from scapy.all import TCP, AsyncSniffer, conf

    conf.verb = 0
    stats: dict[str, dict[str, int]] = defaultdict(
        lambda: {"segments": 0, "syn": 0, "fin": 0, "rst": 0, "payload_segments": 0, "payload_bytes": 0}
    )

    def on_packet(pkt: Any) -> None:
        if TCP not in pkt:
            return
        tcp = pkt[TCP]
        if tcp.sport not in ports and tcp.dport not in ports:
            return
        s = stats[pkt.sniffed_on or "?"]
        s["segments"] += 1
        flags = int(tcp.flags)
        s["syn"] += bool(flags & 0x02)
        s["fin"] += bool(flags & 0x01)
        s["rst"] += bool(flags & 0x04)
        n = len(bytes(tcp.payload))
        if n:
            s["payload_segments"] += 1
            s["payload_bytes"] += n

    sniffer = AsyncSniffer(iface=ifaces, filter="tcp", store=False, prn=on_packet)
    sniffer.start()
    deadline = time.monotonic() + 10
    while not getattr(sniffer, "running", False) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the capture sockets are opened by the sniffer's thread
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    time.sleep(0.3)  # the last segments (FIN, ACK) of connections that just closed
    sniffer.stop()
    print(
        json.dumps({i: stats[i] for i in ifaces} | {k: v for k, v in stats.items() if k not in ifaces}),
        flush=True,
    )
    return 0


def craft(spec: list[dict[str, Any]]) -> int:
    from scapy.all import IP, TCP, RandInt, conf, send

    conf.verb = 0
    sent = 0
    for p in spec:
        for i in range(int(p.get("count", 1))):
            pkt = IP(src=p["src"], dst=p["dst"]) / TCP(
                sport=int(p["sport"]) + i, dport=int(p["dport"]), flags=p["flags"], seq=RandInt()
            )
            send(pkt)
            sent += 1
    print(json.dumps({"sent": sent}), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sniff")
    s.add_argument("--ifaces", default="lo,eth0")
    s.add_argument("--ports", default="8080,15001,15006")
    c = sub.add_parser("craft")
    c.add_argument("--spec", required=True)
    args = ap.parse_args()
    if args.cmd == "sniff":
        return sniff(args.ifaces.split(","), {int(p) for p in args.ports.split(",")})
    return craft(json.loads(args.spec))


if __name__ == "__main__":
    sys.exit(main())
