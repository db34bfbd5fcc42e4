#!/usr/bin/env bash
# Method comparison, API-SS on emoji (20 Conv4 APIs), reduced to fit a 2-core CPU session:
# 1200 episodes (300 meta-updates), a 1 M query budget for every method, 600 meta-test tasks;
# the boundary term starts at meta-update 75 (25% of the run, as the cpu preset's 500 of 2000).
# Two processes fill the same table (finished runs are reused); a final call prints it.
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
ZOO=${ZOO:-runs/zoos/emoji-conv4}
[ -f "$ZOO/zoo.json" ] || $A zoo build --dataset emoji --n-apis 20 --archs conv4 --way 5 --out "$ZOO" --threads 1
COMMON=(--scenario "SS=$ZOO:emoji" --preset cpu --set episodes=1200 --set events.patience=20 --set kd.adv_start=75
        --set query_budget=1000000 --set eval.every=400 --set eval.tasks=100 --set eval.test_tasks=600
        --tasks 600 --out runs/bench/compare --threads 1)
if [ "${1:-all}" = "a" ]; then $A bench "${COMMON[@]}" --methods bidf-mkd,bidf-mkd:no-boundary,bidf-mkd:white-box
elif [ "${1:-all}" = "b" ]; then $A bench "${COMMON[@]}" --methods random,bbkd,bidf-mkd:no-memory,maml-real
elif [ "${1:-all}" = "custom" ]; then $A bench "${COMMON[@]}" --methods "$2" --table "runs/bench/compare/part-$2.md"
else $A bench "${COMMON[@]}" --methods random,maml-real,bbkd,bidf-mkd,bidf-mkd:no-boundary,bidf-mkd:no-memory,bidf-mkd:white-box,bidf-mkd:diverse-memory,bidf-mkd:scheduled --table runs/bench/compare/SS.md
fi
