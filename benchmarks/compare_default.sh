#!/usr/bin/env bash
# The default (`bbkd:colour-leaves-ink`, the cpu preset's method), the former default
# (`bbkd:union-leaves-ink`: the same without the views' colour distortion) and its control without
# the APIs' answers (`bbkd:ssl-leaves-ink`: the same images, never queried) against random init, the
# paper's BiDf-MKD, plain bbkd and the zoo oracle (maml-zoo) in one scenario, 3 training seeds,
# 300 shared meta-test tasks, the fine-tuning protocol chosen on meta-val per run and shot from
# lr 0.1 x head {learned, random} x reinit {0, 2} (BENCHMARKS.md §6). Every row in one --out, so
# every pair is paired on the same tasks and the same arithmetic (one torch thread per cell).
# These three run with their own length and budget (1,000 updates, 50 k queries; the control
# spends none); the others with
# the re-baseline's 300 updates and a 1 M budget. Usage:
#   benchmarks/compare_default.sh SS|SH|MH [OUT]        (then the paired tables are in OUT/*.md)
set -euo pipefail
A=${APIMETA_BIN:-.venv/bin/apimeta}
case "${1:?SS, SH or MH}" in
  SS) ZOO=runs/zoos/emoji-conv4; DS=emoji
      BUILD=(--dataset emoji --n-apis 20 --archs conv4) ;;
  SH) ZOO=runs/zoos/emoji-mixed; DS=emoji
      BUILD=(--dataset emoji --archs conv4,resnet10,resnet18 --n-apis 21 --batch-size 32) ;;
  MH) ZOO=runs/zoos/emoji-kanji; DS=emoji,kanji
      BUILD=(--dataset emoji,kanji --archs conv4,resnet10 --n-apis 12 --batch-size 32) ;;
  *) echo "usage: $0 SS|SH|MH [OUT]" >&2; exit 2 ;;
esac
OUT=${2:-runs/default-$1}
[ -f "$ZOO/zoo.json" ] || $A zoo build "${BUILD[@]}" --way 5 --out "$ZOO" --threads 1
COMMON=(--scenario "$1=$ZOO:$DS" --seeds 3 --workers 2 --preset cpu --set eval.tasks=100
        --set eval.test_lr=0.1 --tasks 300 --out "$OUT" --threads 1
        --tune lr=0.1 --tune head=learned,random --tune reinit=0,2)
$A bench "${COMMON[@]}" --methods random,bbkd:union-leaves-ink,bbkd:ssl-leaves-ink,bbkd:colour-leaves-ink \
  --table "$OUT/default.md"
$A bench "${COMMON[@]}" --methods random,maml-zoo,bidf-mkd,bbkd --set episodes=1200 \
  --set query_budget=1000000 --set eval.every=400 --table "$OUT/baselines.md"
# every row of both calls in one table, paired against random init and bbkd (finished runs are
# reused; the table lists the baselines' own length and budget as config differences)
$A bench "${COMMON[@]}" --methods random,bbkd:union-leaves-ink,bbkd:ssl-leaves-ink,bbkd:colour-leaves-ink,bbkd,bidf-mkd,maml-zoo \
  --table "$OUT/all.md"
