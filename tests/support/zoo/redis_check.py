"""A content check after redis-benchmark: SET a 1 MiB random value with redis-cli, GET it back.

``python redis_check.py HOST PORT BENCH_OUTPUT``: fails when redis-benchmark printed no SET/GET
rate or the value came back different. Prints one JSON line: ok, mismatches, errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys


def main() -> None:
    host, port, bench = sys.argv[1], sys.argv[2], sys.argv[3]
    res: dict[str, object] = {"ok": 0, "mismatches": 0, "errors": []}
    if "SET:" not in bench or "GET:" not in bench:
        res["errors"].append(f"redis-benchmark: {bench[-300:]}")  # type: ignore[union-attr]
    value = os.urandom(512 * 1024).hex()  # 1 MiB of text
    cli = ["redis-cli", "-h", host, "-p", port]
    s = subprocess.run([*cli, "-x", "SET", "zoo"], input=value.encode(), capture_output=True, timeout=30)
    g = subprocess.run([*cli, "--no-raw", "GET", "zoo"], capture_output=True, timeout=30)
    got = g.stdout.decode().strip().strip('"')
    if s.returncode or g.returncode:
        res["errors"].append((s.stderr + g.stderr).decode(errors="replace")[-300:])  # type: ignore[union-attr]
    elif hashlib.sha256(got.encode()).digest() == hashlib.sha256(value.encode()).digest():
        res["ok"] = 1
    else:
        res["mismatches"] = 1
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
