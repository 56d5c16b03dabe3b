"""The ctypes mirrors in sockops/layout.py must match bpf/sockops.h byte for byte."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from sockops import layout

ROOT = Path(__file__).resolve().parent.parent

STRUCTS = {
    "sock_key": layout.SockKey,
    "pending": layout.Pending,
    "synack_key": layout.SynackKey,
    "synack": layout.Synack,
    "sock_state": layout.SockState,
    "conn_state": layout.ConnState,
    "netns_conf": layout.NetnsConf,
    "netns_stats": layout.NetnsStats,
    "pod_ip": layout.PodIp,
    "late_tuple": layout.LateTuple,
    "netns_anomalies": layout.NetnsAnomalies,
    "proc_key": layout.ProcKey,
    "proc_reader": layout.ProcReader,
    "port_key": layout.PortKey,
    "port_info": layout.PortInfo,
}


def _c_layout(tmp_path: Path) -> dict[str, int]:
    """Compile a tiny C program against the header and print sizes, offsets and constants."""
    lines = []
    for name, cls in STRUCTS.items():
        lines.append(f'printf("sizeof.{name} %zu\\n", sizeof(struct {name}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("offset.{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    consts = [
        "ROLE_CLIENT",
        "ROLE_SERVER",
        "PEND_WAITING",
        "PEND_PAIRED",
        "PEND_PASS",
        "DECIDE_UNDECIDED",
        "DECIDE_REDIRECT",
        "DECIDE_LATE",
        "ORIGIN_LATE",
        "DECIDE_PASS",
        "NETNS_F_SIDECAR",
        "NETNS_F_AGENT",
        "NETNS_LOCAL_IPS",
        "CNT_MAX",
        "ANOM_QUEUE_OVER_BUDGET",
        "ANOM_REDIRECT_MISS",
        "ANOM_EARLY_TCP_SEND",
        "ANOM_SPLICE_READER",
        "ANOM_MAX",
        "ANOM_COMM_LEN",
        "SOCKOPS_QUEUE_BUDGET",
        "SOCKOPS_PROXY_UID",
        "PROC_F_SPLICED",
        "PROC_F_SERVES",
        "PROC_F_CLIENT_RECV",
        "PORT_F_RECV",
        "PORT_F_SPLICED",
    ]
    for c in consts:
        lines.append(f'printf("const.{c} %d\\n", (int){c});')
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        f'#include "{ROOT / "bpf" / "sockops.h"}"\nint main(void) {{\n' + "\n".join(lines) + "\nreturn 0; }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(sys.platform != "linux", reason="needs linux/types.h")
def test_structs_match_header(tmp_path: Path) -> None:
    c = _c_layout(tmp_path)
    for name, cls in STRUCTS.items():
        assert ctypes.sizeof(cls) == c[f"sizeof.{name}"], name
        for field, _ in cls._fields_:
            assert getattr(cls, field).offset == c[f"offset.{name}.{field}"], f"{name}.{field}"
    assert c["const.ROLE_SERVER"] == layout.ROLE_SERVER
    assert c["const.PEND_PAIRED"] == layout.PEND_PAIRED
    assert c["const.PEND_PASS"] == layout.PEND_PASS
    assert c["const.DECIDE_REDIRECT"] == layout.DECIDE_REDIRECT
    assert c["const.DECIDE_LATE"] == layout.DECIDE_LATE
    assert c["const.ORIGIN_LATE"] == layout.ORIGIN_LATE
    assert c["const.NETNS_F_SIDECAR"] == layout.NETNS_F_SIDECAR
    assert c["const.NETNS_F_AGENT"] == layout.NETNS_F_AGENT
    assert c["const.NETNS_LOCAL_IPS"] == layout.NETNS_LOCAL_IPS
    assert c["const.CNT_MAX"] == layout.CNT_MAX
    for kind, idx in layout.ANOMALIES.items():
        assert c[f"const.ANOM_{kind.upper()}"] == idx, kind
    assert c["const.ANOM_MAX"] == layout.ANOM_MAX
    assert c["const.ANOM_COMM_LEN"] == layout.ANOM_COMM_LEN
    assert c["const.SOCKOPS_QUEUE_BUDGET"] == layout.DEFAULT_QUEUE_BUDGET
    assert c["const.SOCKOPS_PROXY_UID"] == layout.DEFAULT_PROXY_UID
    for flag in ("PROC_F_SPLICED", "PROC_F_SERVES", "PROC_F_CLIENT_RECV", "PORT_F_RECV", "PORT_F_SPLICED"):
        assert c[f"const.{flag}"] == getattr(layout, flag), flag


def test_counter_indexes_match_header() -> None:
    header = (ROOT / "bpf" / "sockops.h").read_text()
    defined = {}
    for line in header.splitlines():
        parts = line.split()
        if (
            len(parts) >= 3
            and parts[0] == "#define"
            and parts[1].startswith("CNT_")
            and parts[1] != "CNT_MAX"
        ):
            defined[parts[1]] = int(parts[2])
    assert sorted(defined.values()) == sorted(layout.COUNTERS.values())
    assert len(set(layout.COUNTERS.values())) == len(layout.COUNTERS)


def test_addresses_round_trip() -> None:
    for ip in ("127.0.0.1", "10.244.1.10", "::1", "fd00:10:244::10"):
        assert layout.words_to_ip(layout.ip_to_words(ip)) == ip
    s = layout.NetnsSettings(
        sidecar=True, capture_out=15001, capture_in=15006, local_ips=("10.244.1.10", "::1")
    )
    assert layout.NetnsSettings.from_struct(s.to_struct()) == s
