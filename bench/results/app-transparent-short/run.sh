#!/bin/bash
# The short-lived-connection side-by-side of bench/README.md ("App-transparent data plane vs the
# one before it"), exactly as it was run. Both sides run this branch's bench/ and lab/; the
# data plane (sockops/ and, beside it, bpf/) is the checkout's own on the "new" side and
# c1d6b5f's on the "base" side, through a directory of symlinks first on sys.path:
#   git worktree add --detach /work/wt-bench-base c1d6b5f
#   mkdir /work/sbs-base-mix && cd /work/sbs-base-mix
#   ln -s /work/wt-bench/bench bench; ln -s /work/wt-bench/lab lab; ln -s /work/wt-bench-base/sockops sockops
# (c1d6b5f's bench has no short-lived load.) Each results.json records sockops_git_commit (the
# data plane's checkout), bench_git_commit, sockops_dir and bpf_dir.
set -eu
OUT=/work/wt-bench/bench/results/app-transparent-short
PY=/work/main/.venv/bin/python
ARGS="--profile full --modes both --connections 16 --no-closed --no-rate --no-pingpong --repeats 3 --no-progress"
for i in 1 2 3 4 5; do
  for side in base new; do
    if [ "$side" = base ]; then cd /work/sbs-base-mix; else cd /work/wt-bench; fi
    { uptime; ps -eo pcpu,etimes,comm --sort=-pcpu | head -6; } > "$OUT/$side-$i.machine"
    $PY -m bench $ARGS --out "$OUT/$side-$i" > "$OUT/$side-$i.log" 2>&1
  done
done
cd /work/wt-bench && $PY -m bench.sidebyside "$OUT" --load short
