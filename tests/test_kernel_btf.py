"""The kernel-internal offsets the programs use are the running kernel's (issue 12).

bcc compiles against Debian's 6.1 headers on this 6.18 kernel; a field read through those
headers would come from the wrong place. sockops/kernel_btf.py reads the offsets from
/sys/kernel/btf/vmlinux instead. What a user would check: the numbers a program reads through them
agree with what `ss -ti` says about the same sockets.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lab.cgroups import Cgroup
from sockops.kernel_btf import FIELDS, OPTIONAL_FIELDS, kernel_offsets
from sockops.loader import bpf_source_dir

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include "kernel.bpf.h"

struct seen { u32 isn_rx; u32 isn_tx; u32 copied; u32 rcv_nxt; u32 write_seq; u32 style; };
BPF_HASH(seen_by_port, u32, struct seen, 64);

int probe(struct bpf_sock_ops *skops)
{
    struct bpf_sock *sk = skops->sk;
    u32 port = skops->local_port, op = skops->op;
    struct seen s = {}, *p;
    void *tp;

    if (!sk)
        return 1;
    tp = bpf_skc_to_tcp_sock(sk);
    if (!tp)
        return 1;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        s.isn_rx = KFIELD(tp, KOFF_TP_RCV_NXT, u32);    /* peer's ISN + 1 */
        s.isn_tx = KFIELD(tp, KOFF_TP_WRITE_SEQ, u32);    /* own ISN + 1 */
        seen_by_port.update(&port, &s);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    } else if (op == BPF_SOCK_OPS_STATE_CB &&
           (skops->args[1] == BPF_TCP_FIN_WAIT1 || skops->args[1] == BPF_TCP_LAST_ACK)) {
        /* its own FIN, before or after the peer's */
        p = seen_by_port.lookup(&port);
        if (!p)
            return 1;
        p->copied = KFIELD(tp, KOFF_TP_COPIED_SEQ, u32);
        p->rcv_nxt = KFIELD(tp, KOFF_TP_RCV_NXT, u32);
        p->write_seq = KFIELD(tp, KOFF_TP_WRITE_SEQ, u32);
        p->style = reader_style(sk);
    }
    return 1;
}
"""

# A client and a server in one process: the client sends SENT bytes, the server reads READ of
# them; both report their ports, wait until the test has run `ss`, then half-close (the probe reads
# the fields as each socket sends its FIN).
PEER = textwrap.dedent(
    """
    import select, socket, sys
    SENT, READ = 100_000, 60_000
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
    c = socket.socket()
    c.setblocking(sys.argv[1] == "blocking")
    c.connect_ex(ls.getsockname())
    select.select([], [c], [], 10)
    s, _ = ls.accept()
    c.settimeout(10); c.sendall(b"x" * SENT)  # a timeout keeps the file O_NONBLOCK
    c.setblocking(sys.argv[1] == "blocking")
    got = 0
    while got < READ:
        got += len(s.recv(min(65536, READ - got)))
    print(c.getsockname()[1], s.getsockname()[1], flush=True)
    sys.stdin.readline()
    s.shutdown(socket.SHUT_WR); c.shutdown(socket.SHUT_WR)
    print("done", flush=True)
    """
)


def ss_field(port: int, name: str) -> int:
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    m = re.search(rf"\b{name}:(\d+)", out)
    assert m, (name, out)
    return int(m.group(1))


def test_every_field_is_found_in_the_running_kernel() -> None:
    offsets = kernel_offsets().offsets
    required = {macro for macro, _, _ in FIELDS}
    optional = {macro for macro, _, _ in OPTIONAL_FIELDS}  # the reader hook's: all or none
    assert required <= set(offsets) and set(offsets) - required in (set(), optional)
    assert all(0 <= off < 8192 for off in offsets.values()), offsets


@pytest.mark.timeout(120)
@pytest.mark.parametrize("style", ["blocking", "nonblocking"])
def test_fields_read_in_bpf_match_ss(cgroup: Cgroup, style: str) -> None:
    """copied_seq, rcv_nxt and write_seq read through the BTF offsets equal `ss -ti`'s counts, and
    the reader style from the file flags is the one the socket was given."""
    from bcc import BPF, BPFAttachType

    b = BPF(text=PROGRAM, cflags=[f"-I{bpf_source_dir()}", *kernel_offsets().cflags()])
    fn = b.load_func("probe", BPF.SOCK_OPS)
    cg_fd = cgroup.open_fd()
    b.attach_func(fn, cg_fd, BPFAttachType.CGROUP_SOCK_OPS)
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", PEER, style],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=cgroup.preexec_fn(),
        )
        assert proc.stdout is not None and proc.stdin is not None
        client_port, server_port = map(int, proc.stdout.readline().split())
        deadline = time.monotonic() + 10
        while (server_received := ss_field(server_port, "bytes_received")) < 100_000:
            assert time.monotonic() < deadline, server_received  # the rest is still in flight
            time.sleep(0.05)
        while (client_acked := ss_field(client_port, "bytes_acked") - 1) < 100_000:  # - the SYN
            assert time.monotonic() < deadline, client_acked  # the last ACK is on its way
            time.sleep(0.05)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        proc.wait(timeout=30)
        seen = {k.value: v for k, v in b["seen_by_port"].items()}
        server, client = seen[server_port], seen[client_port]
        assert (server.rcv_nxt - server.isn_rx) % 2**32 == server_received == 100_000
        assert (server.copied - server.isn_rx) % 2**32 == 60_000  # what the server read
        assert (client.write_seq - client.isn_tx) % 2**32 == client_acked == 100_000
        want = 1 if style == "nonblocking" else 2  # READER_NONBLOCK / READER_BLOCKING
        assert client.style == want and server.style == 2, (client.style, server.style)
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        b.detach_func(fn, cg_fd, BPFAttachType.CGROUP_SOCK_OPS)
        os.close(cg_fd)
        b.cleanup()


def test_programs_refuse_to_compile_without_offsets(tmp_path: Path) -> None:
    """The C never falls back to guessed offsets: without the loader's -D flags it does not build."""
    from bcc import BPF

    text = '#include "kernel.bpf.h"\nint f(void *ctx) { return 0; }\n'
    with pytest.raises(Exception, match="compile"):
        BPF(text=text, cflags=[f"-I{bpf_source_dir()}"])
