#!/bin/bash
# The keep-alive side-by-side of bench/README.md ("Session 7's data plane, keep-alive, side by
# side"), exactly as it was run: c1d6b5f (the data plane before issue 12, a worktree of it)
# against this checkout at 5ee5b56 (the reader hook attached, sockets get a psock once their
# program has read with recv(), the bench probes nginx before each run; the bench does not run
# the agent), each side from its own checkout, five interleaved invocations of 3 repeats.
#   git worktree add --detach /work/wt-base c1d6b5f
set -eu
OUT=/work/main/bench/results/reader-hook-keepalive
PY=/work/main/.venv/bin/python
ARGS="--profile full --modes both --connections 16 --no-rate --no-pingpong --repeats 3 --no-progress"
for i in 1 2 3 4 5; do
  for side in base new; do
    if [ "$side" = base ]; then cd /work/wt-base; EXTRA=""; else cd /work/main; EXTRA="--no-short"; fi
    { uptime; ps -eo pcpu,etimes,comm --sort=-pcpu | head -6; } > "$OUT/$side-$i.machine"
    $PY -m bench $ARGS $EXTRA --out "$OUT/$side-$i" > "$OUT/$side-$i.log" 2>&1
  done
done
cd /work/main && $PY -m bench.sidebyside "$OUT"
