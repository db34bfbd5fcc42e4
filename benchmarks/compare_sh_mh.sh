#!/usr/bin/env bash
# Issue-3 comparison, API-SH (emoji, Conv4/ResNet-10/ResNet-18 APIs) and API-MH (emoji + kanji,
# Conv4/ResNet-10 APIs), same reduced settings as compare_ss.sh; rows random, bbkd, bidf-mkd.
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
SH=runs/zoos/emoji-mixed; MH=runs/zoos/emoji-kanji
[ -f "$SH/zoo.json" ] && [ "$(grep -c api- "$SH/zoo.json")" -ge 21 ] || \
  $A zoo build --dataset emoji --archs conv4,resnet10,resnet18 --n-apis 21 --way 5 --batch-size 32 --out "$SH" --threads 1
[ -f "$MH/zoo.json" ] && [ "$(grep -c api- "$MH/zoo.json")" -ge 20 ] || \
  $A zoo build --dataset emoji,kanji --archs conv4,resnet10 --n-apis 20 --way 5 --batch-size 32 --out "$MH" --threads 1
$A bench --scenario "SH=$SH:emoji" --scenario "MH=$MH:emoji,kanji" --methods "${METHODS:-random,bbkd,bidf-mkd}" \
  --preset cpu --set episodes=1200 --set api_patience=20 --set adv_start=75 --set query_budget=1000000 \
  --set eval_every=400 --set eval_tasks=100 --set test_tasks=600 --tasks 600 \
  --out runs/bench/compare --table runs/bench/compare/SH-MH.md --threads 1
