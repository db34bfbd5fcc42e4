#!/usr/bin/env bash
# Training-seed spread of the comparison: the same reduced settings as compare_ss.sh /
# compare_sh_mh.sh, the same 600 meta-test tasks (their seed is fixed), a different training seed
# (meta-model init, task sampling, recovery noise, API draw order).
# Usage: [SCEN=SS|MH] benchmarks/compare_seeds.sh SEED [METHODS]
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
SEED=${1:?usage: [SCEN=SS|MH] compare_seeds.sh SEED [METHODS]}
case "${SCEN:-SS}" in
  SS) SCENARIO="SS=${ZOO:-runs/zoos/emoji-conv4}:emoji" ;;
  MH) SCENARIO="MH=${ZOO:-runs/zoos/emoji-kanji}:emoji,kanji" ;;
  *) echo "SCEN must be SS or MH" >&2; exit 2 ;;
esac
$A bench --scenario "$SCENARIO" --methods "${2:-random,bbkd,bidf-mkd}" --preset cpu \
  --set seed="$SEED" --set episodes=1200 --set events.patience=20 --set kd.adv_start=75 \
  --set query_budget=1000000 --set eval.every=400 --set eval.tasks=100 --set eval.test_tasks=600 \
  --tasks 600 --out "runs/bench/seed$SEED" --threads 1 --table "runs/bench/seed$SEED/${SCEN:-SS}.md"
