"""What the reader hook costs the node's syscalls: a raw tracepoint on sys_enter runs for every
system call of every process (bpf/reader.bpf.c). It leaves at once for most; a read() walks from
the task to its network namespace, and, in an enabled namespace, on to the file; splice() always
walks to the file.

``python -m bench.readercost [--calls 2000000] [--repeats 7] [--out FILE]``

A C loop (compiled here with gcc) makes ``--calls`` calls of one kind and prints the nanoseconds
per call: getppid() (the cheapest syscall: what every syscall pays), read() of an empty
non-blocking pipe (EAGAIN) from a namespace that is not enabled, the same read() with this
namespace enabled in the scratch data plane (the walk to the file), and splice() of an empty pipe.
Runs alternate without and with the hook attached, ``--repeats`` of each, on one loaded data plane
(a scratch bpffs directory; nothing is attached to a cgroup, so no traffic is touched). Reported:
median and spread per case, and the difference in ns per call. The data plane is removed at the
end, also on an error.
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
from sockops import layout, loader, netns, reader_hook

LOOP_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = atol(argv[1]);
	int splice_mode = argc > 2 && strcmp(argv[2], "splice") == 0;
	int read_mode = argc > 2 && strncmp(argv[2], "read", 4) == 0;
	int in[2], out[2];
	char c;
	struct timespec a, b;

	if (pipe2(in, O_NONBLOCK) || pipe2(out, O_NONBLOCK))
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		if (splice_mode)
			splice(in[0], NULL, out[1], NULL, 1, SPLICE_F_NONBLOCK); /* EAGAIN: empty */
		else if (read_mode)
			(void)!read(in[0], &c, 1); /* EAGAIN: empty */
		else
			getppid();
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""


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
    modes = ("getppid", "read", "read-enabled", "splice")
    results: dict[str, dict[str, list[float]]] = {m: {"off": [], "on": []} for m in modes}
    here = netns.cookie(Path("/proc/self/ns/net"))
    with tempfile.TemporaryDirectory(prefix="sockops-bench-reader-") as tmp:
        exe = build(Path(tmp))
        plane = loader.DataPlane.load(bpffs)
        prog = plane.programs.get(loader.PROG_READER)
        if prog is None:
            sys.exit(f"the reader hook did not load: {plane.notes}")
        maps = plane.maps()
        try:
            for _ in range(args.repeats):
                for state in ("off", "on"):
                    if state == "on":
                        reader_hook.attach(prog.fd, bpffs)  # type: ignore[attr-defined]
                    try:
                        for mode in modes:
                            if mode == "read-enabled":
                                maps.enable(here, layout.NetnsSettings())
                            try:
                                results[mode][state].append(per_call(exe, args.calls, mode))
                            finally:
                                if mode == "read-enabled":
                                    maps.disable(here)
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
