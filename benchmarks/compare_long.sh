#!/usr/bin/env bash
# API-SS on emoji at 1,000 meta-updates (4,000 episodes; compare_ss.sh runs 300): does the gap to
# bbkd and to random init change with a longer run? Boundary term from update 250 (25%, as there).
# Usage: benchmarks/compare_long.sh [METHODS]   (several processes may fill one table)
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
ZOO=${ZOO:-runs/zoos/emoji-conv4}
$A bench --scenario "SS=$ZOO:emoji" --methods "${1:-random,bbkd,bidf-mkd}" --preset cpu \
  --set episodes=4000 --set events.patience=20 --set kd.adv_start=250 --set query_budget=1000000 \
  --set eval.every=400 --set eval.tasks=100 --set eval.test_tasks=600 \
  --tasks 600 --out runs/bench/long --threads 1 --table runs/bench/long/SS.md
