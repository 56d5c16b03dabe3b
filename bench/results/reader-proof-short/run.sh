#!/bin/bash
# The short-lived-connection side-by-side of bench/README.md ("Session 7's data plane,
# short-lived connections"), exactly as it was run: d6ae737 (session 6's reader hook, a worktree
# of it) against this checkout at ab5a3d1 (sockets get a psock once their program has read with
# recv(): sock_ops looks up the port's or the process's proof on every new connection; the bench
# probes nginx before each run), each side from its own checkout, five interleaved invocations of
# 3 repeats each.
#   git worktree add --detach /work/wt-base6 d6ae737
set -eu
OUT=/work/main/bench/results/reader-proof-short
PY=/work/main/.venv/bin/python
ARGS="--profile full --modes both --connections 16 --no-closed --no-rate --no-pingpong --repeats 3 --no-progress"
for i in 1 2 3 4 5; do
  for side in base new; do
    if [ "$side" = base ]; then cd /work/wt-base6; else cd /work/main; fi
    { uptime; ps -eo pcpu,etimes,comm --sort=-pcpu | head -6; } > "$OUT/$side-$i.machine"
    $PY -m bench $ARGS --out "$OUT/$side-$i" > "$OUT/$side-$i.log" 2>&1
  done
done
cd /work/main && $PY -m bench.sidebyside "$OUT" --load short
