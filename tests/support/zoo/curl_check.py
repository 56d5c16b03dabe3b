"""curl as an HTTP client: POST a random body N times, compare each response with sha256.

``python curl_check.py URL N SIZE``: one curl process per request (libcurl's sockets are
non-blocking, it waits in poll()). Prints one JSON line: ok, mismatches, errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile


def main() -> None:
    url, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    res: dict[str, object] = {"ok": 0, "mismatches": 0, "errors": []}
    with tempfile.TemporaryDirectory() as d:
        body = os.path.join(d, "body")
        for _ in range(n):
            data = os.urandom(size)
            with open(body, "wb") as f:
                f.write(data)
            p = subprocess.run(
                ["curl", "-sS", "--fail", "--max-time", "20", "--data-binary", f"@{body}",
                 "-H", "Content-Type: application/octet-stream", url],
                capture_output=True,
            )  # fmt: skip
            if p.returncode != 0:
                res["errors"].append(p.stderr.decode(errors="replace")[-200:])  # type: ignore[union-attr]
            elif hashlib.sha256(p.stdout).digest() == hashlib.sha256(data).digest():
                res["ok"] = int(res["ok"]) + 1  # type: ignore[call-overload]
            else:
                res["mismatches"] = int(res["mismatches"]) + 1  # type: ignore[call-overload]
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
