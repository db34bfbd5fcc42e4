#!/usr/bin/env bash
# Method comparison, API-SH (emoji; Conv4/ResNet-10/ResNet-18 APIs) and API-MH (emoji + kanji;
# Conv4/ResNet-10 APIs), same reduced settings as compare_ss.sh; every method and ablation.
# Usage: [METHODS=a,b] benchmarks/compare_sh_mh.sh SH|MH|table   (several processes, each with its
# own METHODS, may fill one table; `table` then assembles it from the finished runs)
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
SH=runs/zoos/emoji-mixed; MH=runs/zoos/emoji-kanji
COMMON=(--methods "${METHODS:-random,maml-real,bbkd,bidf-mkd,bidf-mkd:no-boundary,bidf-mkd:no-memory,bidf-mkd:white-box}" --preset cpu --set episodes=1200
        --set events.patience=20 --set kd.adv_start=75 --set query_budget=1000000 --set eval.every=400
        --set eval.tasks=100 --set eval.test_tasks=600 --tasks 600 --out runs/bench/compare --threads 1)
case "${1:-table}" in
  SH) $A zoo build --dataset emoji --archs conv4,resnet10,resnet18 --n-apis 21 --way 5 --batch-size 32 --out "$SH" --threads 1
      $A bench --scenario "SH=$SH:emoji" "${COMMON[@]}" --table runs/bench/compare/part-SH.md ;;
  MH) $A zoo build --dataset emoji,kanji --archs conv4,resnet10 --n-apis 12 --way 5 --batch-size 32 --out "$MH" --threads 1
      $A bench --scenario "MH=$MH:emoji,kanji" "${COMMON[@]}" --table runs/bench/compare/part-MH.md ;;
  table) $A bench --scenario "SH=$SH:emoji" --scenario "MH=$MH:emoji,kanji" "${COMMON[@]}" --table runs/bench/compare/SH-MH.md ;;
esac
