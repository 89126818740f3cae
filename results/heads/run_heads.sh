#!/usr/bin/env bash
# MTP heads on SmolLM2-135M over Jane Austen (issue 5): frozen, WHS and joint, then held-out
# accuracy beside marginalisation. Run from the repository root after `make prepare`.
# Training stops at --steps or after --time-budget seconds, whichever comes first (the CPU is
# shared); rerunning a train-heads line resumes from its checkpoint.
set -euo pipefail
MTP=${MTP:-.venv/bin/mtp-ext}
CKPT=${CKPT:-/tmp/mtp-heads}          # checkpoints stay out of the repository (joint: 0.5 GB + optimizer)
OUT=results/heads
BUDGET=${BUDGET:-540}
MARGINAL_STEPS=${MARGINAL_STEPS:-3}
mkdir -p "$OUT"
common=(--model smollm2-135m --data austen --heads 3 --seq-len 128 --batch-size 2 --eval-tokens 512 --lr 2e-3)
nice -n 10 $MTP train-heads "${common[@]}" --steps 0 --out "$CKPT/untrained"
nice -n 10 $MTP train-heads "${common[@]}" --steps 200 --time-budget "$BUDGET" --out "$CKPT/frozen"
nice -n 10 $MTP train-heads "${common[@]}" --whs --steps 200 --time-budget "$BUDGET" --out "$CKPT/whs"
nice -n 10 $MTP train-heads "${common[@]}" --joint --backbone-lr 3e-5 --steps 200 --time-budget "$BUDGET" \
  --out "$CKPT/joint"
for variant in untrained frozen whs joint; do cp "$CKPT/$variant/train.json" "$OUT/train-$variant.json"; done
nice -n 10 $MTP eval-heads --model smollm2-135m --data austen --seq-len 256 --tokens 1275 \
  --marginal-steps "$MARGINAL_STEPS" --max-candidates 16 --max-nodes 64 \
  --heads-dir "$CKPT/untrained" "$CKPT/frozen" "$CKPT/whs" "$CKPT/joint" --json "$OUT/eval-heads.json"
