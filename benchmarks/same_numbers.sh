#!/usr/bin/env bash
# Do two commits train the same numbers? Seeded short runs of bidf-mkd (with API events, the
# boundary term and memory replay), bbkd and maml-real on a 4-API emoji zoo, run once with the
# code of each commit; metrics.jsonl compared line by line without the timing fields.
#   benchmarks/same_numbers.sh OLD_COMMIT [NEW_COMMIT]    (NEW default: the working tree)
# Prints "identical" or the first differing lines per method; exit 1 if any differ.
set -euo pipefail
OLD=${1:?usage: same_numbers.sh OLD_COMMIT [NEW_COMMIT]}; NEW=${2:-}
ROOT=$(git rev-parse --show-toplevel); PY="$ROOT/.venv/bin/python"
WORK=$(mktemp -d); trap 'git -C "$ROOT" worktree remove --force "$WORK/old" 2>/dev/null; [ -n "$NEW" ] && git -C "$ROOT" worktree remove --force "$WORK/new" 2>/dev/null; true' EXIT
export APIMETA_HOME=${APIMETA_HOME:-$WORK/home}
git -C "$ROOT" worktree add -q --detach "$WORK/old" "$OLD"
if [ -n "$NEW" ]; then git -C "$ROOT" worktree add -q --detach "$WORK/new" "$NEW"; NEWSRC=$WORK/new/src; else NEWSRC=$ROOT/src; fi
apimeta() { PYTHONPATH="$SRC" "$PY" -c "from apimeta.cli import app; app()" "$@"; }
SRC=$WORK/old/src apimeta zoo build --dataset emoji --n-apis 4 --archs conv4 --way 5 --out "$WORK/zoo" --threads 1 > /dev/null
# flat keys: read by the old layout and (mapped, with a warning) by the new one
S=(--set eval_every=8 --set eval_tasks=10 --set test_tasks=20 --set adv_start=2 --set api_patience=2 --set checkpoint_every=3)
status=0
for tag in old new; do
  if [ $tag = old ]; then SRC=$WORK/old/src; else SRC=$NEWSRC; fi
  apimeta train --method bidf-mkd --preset cpu --zoo "$WORK/zoo" --episodes 48 --threads 1 --out "$WORK/$tag-bidf-mkd" "${S[@]}" > "$WORK/$tag-bidf-mkd.log" 2>&1
  apimeta train --method bbkd --preset cpu --zoo "$WORK/zoo" --episodes 24 --threads 1 --out "$WORK/$tag-bbkd" "${S[@]}" > "$WORK/$tag-bbkd.log" 2>&1
  apimeta train --method maml-real --preset cpu --episodes 24 --threads 1 --out "$WORK/$tag-maml-real" "${S[@]}" > "$WORK/$tag-maml-real.log" 2>&1
done
for m in bidf-mkd bbkd maml-real; do
  for tag in old new; do
    "$PY" -c "import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l); d.pop('step_time', None); print(json.dumps(d, sort_keys=True))" "$WORK/$tag-$m/metrics.jsonl" > "$WORK/$tag-$m.norm"
  done
  n=$(wc -l < "$WORK/old-$m.norm")
  if cmp -s "$WORK/old-$m.norm" "$WORK/new-$m.norm"; then echo "$m: identical ($n metrics lines)"
  else echo "$m: DIFFERENT"; diff "$WORK/old-$m.norm" "$WORK/new-$m.norm" | head -8 || true; status=1; fi
done
exit $status
