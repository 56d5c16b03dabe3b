"""The queue budget (issue 12, item 2): a receiver that stops reading gets no unbounded queue.

A redirected byte skips TCP's flow control: it is queued on the peer's psock whether or not the
peer reads. Past SOCKOPS_QUEUE_BUDGET unread bytes the sender's messages go over TCP for good
(redirect.bpf.c), where a full receive window blocks the sender again, and the anomaly is
counted for the sending namespace with the sending program's pid and comm (struct
netns_anomalies). Checked with tests/support/stalled_reader.py in a lab pod: the sender is held
back after about budget + TCP's own buffers, and when the reader resumes it reads every byte in
order (sha256 of both ends).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import Plane, wait_drained
from support.metrics_view import run_pairs
from support.podtraffic import _read_json_line, popen_piped
from support.stalled_reader import CHUNK

from lab.podlab import Lab
from sockops import layout

pytestmark = [pytest.mark.kernel]

STALLED_READER = Path(__file__).resolve().parent / "support" / "stalled_reader.py"
BUDGET = layout.DEFAULT_QUEUE_BUDGET
TOTAL = 64 << 20
# What plain TCP may hold on a stalled connection besides the psock queue: the receiver's
# autotuned buffer (tcp_rmem max) plus the sender's (tcp_wmem max), read from the running kernel.
TCP_SLACK = sum(int(Path(f"/proc/sys/net/ipv4/{n}").read_text().split()[2]) for n in ("tcp_rmem", "tcp_wmem"))


@pytest.mark.timeout(120)
def test_stalled_reader_gets_backpressure_and_every_byte(dataplane: Plane, lab: Lab) -> None:
    pod = lab.add_pod("app", ip="10.244.1.10")
    cookie = dataplane.enable(pod)
    proc = popen_piped(pod, [sys.executable, str(STALLED_READER), "--total", str(TOTAL), "--hold"])
    try:
        stalled = _read_json_line(proc, 60, "stalled reader")
        c = dataplane.counters()
        stats = dataplane.stats(cookie)
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    done = json.loads(out.strip().splitlines()[-1])

    # Backpressure: the sender was held back, after the budget plus what TCP itself buffers.
    assert stalled["backpressure"], stalled
    assert stalled["accepted"] <= BUDGET + TCP_SLACK, (stalled, TCP_SLACK)
    # The connection was accelerated, and the psock queue stopped at the budget plus the one
    # message that crossed it (already redirected when the program saw the queue; a message is
    # at most one send() of the program, CHUNK bytes).
    assert stats is not None
    assert BUDGET < stats["redirected_bytes"] <= BUDGET + CHUNK, stats
    assert c["queue_over_budget"] == 1, c
    anomalies = dataplane.maps.anomalies()[cookie]
    assert anomalies.counts["queue_over_budget"] == 1, anomalies
    assert anomalies.last["queue_over_budget"] == (stalled["pid"], stalled["comm"]), anomalies
    # Every byte, in order, once the reader resumed.
    assert done["received"] == done["sent"] == TOTAL, done
    assert done["sha_received"] == done["sha_sent"], done
    wait_drained(dataplane)


@pytest.mark.timeout(120)
def test_a_reader_that_keeps_up_never_crosses_the_budget(dataplane: Plane, lab: Lab) -> None:
    """32 MiB each way on one connection, 1 MiB at a time, every message read before the next:
    the psock queue never holds more than one message, so the whole stream stays redirected
    (the count the budget reads goes down as the reader reads)."""
    pod = lab.add_pod("app", ip="10.244.1.10")
    cookie = dataplane.enable(pod)
    res = run_pairs(pod, connections=1, size=1 << 20, rounds=32)
    assert res["mismatches"] == 0, res
    c = dataplane.counters()
    assert c["queue_over_budget"] == 0, c
    assert dataplane.stats(cookie)["redirected_bytes"] == 2 * 32 << 20
    wait_drained(dataplane)
