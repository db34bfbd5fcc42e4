#!/usr/bin/env bash
# Benchmark: random init vs the real-data MAML ceiling (maml-real) on the built-in
# datasets, 5-way 1-shot and 5-shot, 600 fixed meta-test tasks (the same for both inits).
# Usage: benchmarks/ceiling.sh DATASET SHOT [EPISODES]   (writes into runs/bench/)
set -euo pipefail
ds=${1:-emoji}; shot=${2:-1}; episodes=${3:-4000}
out=runs/bench/maml-real-$ds-${shot}shot
A=${APIMETA_BIN:-.venv/bin/apimeta}
$A train --method maml-real --preset cpu --dataset "$ds" --shot "$shot" --episodes "$episodes" \
  --set eval.test_tasks=600 --set eval.tasks=100 --out "$out" --threads 1
$A eval --init "$out/best.pt" --dataset "$ds" --shots 1,5 --tasks 600 --threads 1 \
  --json "$out/eval-best.json"
