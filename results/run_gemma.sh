#!/usr/bin/env bash
# The Gemma-3-270M cells of results/ (issue 4). Steps 1-2 ran in sessions 1-2; the steps-3
# evaluations (this script's eval lines with --steps 3) ran in session 3, one thread each (67 and
# 132 minutes), and replaced the steps-2 eval.json / fig1.png.
# Run from the repository root after `make prepare MODELS="smollm2-135m gemma3-270m"`.
set -euo pipefail
MTP=${MTP:-.venv/bin/mtp-ext}
eval_cell() {  # $1: corpus
  $MTP eval --model gemma3-270m --data "$1" --steps 3 --top-p 0.99 --max-candidates 16 --max-nodes 64 --threads 1 \
    --tokens 4096 --batch-size 2 --json "results/gemma3-270m-$1/eval.json" --plot "results/gemma3-270m-$1/fig1.png"
}
mkdir -p results/gemma3-270m-austen results/gemma3-270m-bible-en-es
$MTP analyze --model gemma3-270m --data austen --tokens 4096 --out results/gemma3-270m-austen
eval_cell austen
eval_cell bible-en-es
$MTP analyze --model gemma3-270m --data bible-en-es --tokens 4096 --out results/gemma3-270m-bible-en-es
