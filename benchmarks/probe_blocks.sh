#!/usr/bin/env bash
# Which feature blocks of an init carry its gain (BENCHMARKS.md §6): meta-val, 100 tasks per shot,
# lr 0.1, a fresh head, with the last N stages re-drawn (N = 3, 2, 1, 0: keep block 0, blocks
# 0-1, blocks 0-2, all), for each init given and for random init (whose re-drawn stages differ
# per N). Usage: benchmarks/probe_blocks.sh CHECKPOINT [CHECKPOINT ...]
#   e.g. benchmarks/probe_blocks.sh runs/shmh/SH/maml-zoo/seed-2022/best.pt
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
[ $# -ge 1 ] || { echo "usage: $0 CHECKPOINT [CHECKPOINT ...]" >&2; exit 2; }
for R in 3 2 1 0; do
  for I in "$@" random; do
    echo "== $I reinit=$R"
    $A eval --init "$I" --dataset emoji --split val --tasks 100 --lr 0.1 --head random \
      --reinit "$R" --threads 1 2>&1 | grep -E "INFO .*(val|test) [0-9]-shot"
  done
done
