#!/usr/bin/env bash
# Tuning run (selection on meta-VAL only): API-event patience 5 instead of 20 on API-SS emoji,
# otherwise the compare_ss.sh settings. Test accuracy is read once, at the val-selected checkpoint.
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
P=${1:-5}
out=runs/bench/tune/patience$P
[ -f "$out/test.json" ] || $A train --preset cpu --zoo runs/zoos/emoji-conv4 --episodes 1200 \
  --set events.patience=$P --set kd.adv_start=75 --set query_budget=1000000 --set eval.every=400 --set eval.tasks=100 \
  --set eval.test_tasks=600 --out "$out" --threads 1
$A eval --init "$out/best.pt" --dataset emoji --shots 1,5 --tasks 600 --threads 1 --json "$out/eval-best.json"
