#!/usr/bin/env bash
# The Gemma-3-270M cells of results/ (issue 4), steps 1-2 only: steps 3 at 4,096 positions did not fit
# this session's CPU time. Run from the repository root after `make prepare MODELS="smollm2-135m gemma3-270m"`.
set -euo pipefail
MTP=${MTP:-.venv/bin/mtp-ext}
for data in austen bible-en-es; do
  out=results/gemma3-270m-$data
  mkdir -p "$out"
  $MTP analyze --model gemma3-270m --data "$data" --tokens 4096 --out "$out"
  $MTP eval --model gemma3-270m --data "$data" --steps 2 --top-p 0.99 --max-candidates 16 --max-nodes 64 \
    --tokens 4096 --batch-size 2 --json "$out/eval.json" --plot "$out/fig1.png"
done
