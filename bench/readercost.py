"""What the reader hook costs the node's syscalls: a raw tracepoint on sys_enter runs for every
system call of every process, and leaves at once unless it is one of the ten it watches
(bpf/reader.bpf.c).

``python -m bench.readercost [--calls 2000000] [--repeats 7] [--out FILE]``

A C loop (compiled here with gcc) makes ``--calls`` getppid() calls, the cheapest syscall, and
prints the nanoseconds per call; runs alternate without and with the hook attached, ``--repeats``
of each, on the same loaded data plane (a scratch bpffs directory; nothing is attached to a
cgroup, so no traffic is touched). Three more loops: splice() on a pipe (the hook's walk from the
task to the file), read() on a pipe by a process that does not serve (one map lookup), and recv()
on an idle loopback TCP socket by a process that listened and accepted (the walk to the socket
and the lookup of its port's proof; no byte is sent). Reported: median and spread per case, and the
difference in ns per call. The data plane is removed at the end, also on an error.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.machine import describe
from sockops import loader, reader_hook

LOOP_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A listener on 127.0.0.1 (any port), a client connected to it and the accepted end; returns
 * the accepted end. Nothing is ever sent: the loop's recv() finds it empty. */
static int tcp_pair(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(a);
	int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0);

	if (l < 0 || c < 0 || bind(l, (void *)&a, sizeof(a)) || listen(l, 1))
		return -1;
	if (getsockname(l, (void *)&a, &len) || connect(c, (void *)&a, sizeof(a)))
		return -1;
	return accept(l, NULL, NULL);
}

int main(int argc, char **argv)
{
	long n = atol(argv[1]);
	const char *mode = argc > 2 ? argv[2] : "getppid";
	int in[2], out[2], fd = -1;
	struct timespec a, b;
	char byte;

	if (strcmp(mode, "splice") == 0 || strcmp(mode, "read") == 0) {
		if (pipe2(in, O_NONBLOCK) || pipe2(out, O_NONBLOCK))
			return 1;
	} else if (strcmp(mode, "serving-recv") == 0) {
		fd = tcp_pair();	/* listen() and accept(): the hook knows this process serves */
		if (fd < 0)
			return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		if (strcmp(mode, "splice") == 0)
			splice(in[0], NULL, out[1], NULL, 1, SPLICE_F_NONBLOCK); /* EAGAIN: empty */
		else if (strcmp(mode, "read") == 0)
			read(in[0], &byte, 1);				/* EAGAIN: empty */
		else if (fd >= 0)
			recv(fd, &byte, 1, MSG_DONTWAIT);		/* EAGAIN: nothing sent */
		else
			getppid();
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""


# getppid: any syscall; splice: on a pipe, the walk from the task to the file; read: on a pipe, by
# a process that does not serve (one map lookup); serving-recv: recv() on a TCP socket by a process
# that listened and accepted, the walk to the socket and its port's proof.
MODES = ("getppid", "splice", "read", "serving-recv")


def build(workdir: Path) -> Path:
    src = workdir / "loop.c"
    src.write_text(LOOP_C)
    exe = workdir / "loop"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def per_call(exe: Path, calls: int, mode: str) -> float:
    out = subprocess.run([str(exe), str(calls), mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    bpffs = Path("/sys/fs/bpf") / f"sockops-bench-reader-{secrets.token_hex(3)}"
    results: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in MODES}
    with tempfile.TemporaryDirectory(prefix="sockops-bench-reader-") as tmp:
        exe = build(Path(tmp))
        plane = loader.DataPlane.load(bpffs)
        prog = plane.programs.get(loader.PROG_READER)
        if prog is None:
            sys.exit(f"the reader hook did not load: {plane.notes}")
        try:
            for _ in range(args.repeats):
                for state in ("off", "on"):
                    if state == "on":
                        reader_hook.attach(prog.fd, bpffs)  # type: ignore[attr-defined]
                    try:
                        for mode in results:
                            results[mode][state].append(per_call(exe, args.calls, mode))
                    finally:
                        reader_hook.detach(bpffs)
        finally:
            plane.bpf.close()  # type: ignore[attr-defined]
            loader.unpin(bpffs)

    def stats(v: list[float]) -> dict[str, float]:
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    summary: dict[str, Any] = {}
    for mode, by_state in results.items():
        spread = {st: stats(v) for st, v in by_state.items()}
        summary[mode] = {
            "ns_per_call_off": spread["off"],
            "ns_per_call_on": spread["on"],
            "added_ns_per_call": round(spread["on"]["median"] - spread["off"]["median"], 2),
        }
    doc = {
        "machine": describe(" ".join(["python -m bench.readercost", *(argv or sys.argv[1:])])),
        "calls": args.calls,
        "repeats": args.repeats,
        "raw": results,
        "summary": summary,
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
