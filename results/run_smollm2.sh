#!/usr/bin/env bash
# The SmolLM2-135M cells of results/ (issue 4). Run from the repository root after `make prepare`.
set -euo pipefail
MTP=${MTP:-.venv/bin/mtp-ext}
for data in austen bible-en-es; do
  out=results/smollm2-135m-$data
  mkdir -p "$out"
  $MTP eval --model smollm2-135m --data "$data" --steps 3 --top-p 0.99 --max-candidates 16 --max-nodes 64 \
    --tokens 4096 --json "$out/eval.json" --plot "$out/fig1.png"
  $MTP analyze --model smollm2-135m --data "$data" --tokens 4096 --out "$out"
done
