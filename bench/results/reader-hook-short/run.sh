#!/bin/bash
# The short-lived-connection side-by-side of bench/README.md ("The reader hook, short-lived
# connections"), exactly as it was run: 2e1a4ed (session 5's data plane, a worktree of it)
# against this checkout (the reader hook attached: sock_ops looks up the connecting and accepting
# process, every syscall passes the raw tracepoint), each side from its own checkout, five
# interleaved invocations of 3 repeats each.
#   git worktree add --detach /work/wt-base 2e1a4ed
set -eu
OUT=/work/main/bench/results/reader-hook-short
PY=/work/main/.venv/bin/python
ARGS="--profile full --modes both --connections 16 --no-closed --no-rate --no-pingpong --repeats 3 --no-progress"
for i in 1 2 3 4 5; do
  for side in base new; do
    if [ "$side" = base ]; then cd /work/wt-base; else cd /work/main; fi
    { uptime; ps -eo pcpu,etimes,comm --sort=-pcpu | head -6; } > "$OUT/$side-$i.machine"
    $PY -m bench $ARGS --out "$OUT/$side-$i" > "$OUT/$side-$i.log" 2>&1
  done
done
cd /work/main && $PY -m bench.sidebyside "$OUT" --load short
