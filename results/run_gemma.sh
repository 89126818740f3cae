#!/usr/bin/env bash
# The Gemma-3-270M cells of results/ (issue 4), steps 1-2 only: steps 3 at 4,096 positions (about an
# hour a cell on 2 free cores) did not fit the sessions' CPU time. The last line ran in session 2
# (about 7 s a sequence on free cores).
# Run from the repository root after `make prepare MODELS="smollm2-135m gemma3-270m"`.
set -euo pipefail
MTP=${MTP:-.venv/bin/mtp-ext}
eval_cell() {  # $1: corpus
  $MTP eval --model gemma3-270m --data "$1" --steps 2 --top-p 0.99 --max-candidates 16 --max-nodes 64 \
    --tokens 4096 --batch-size 2 --json "results/gemma3-270m-$1/eval.json" --plot "results/gemma3-270m-$1/fig1.png"
}
mkdir -p results/gemma3-270m-austen results/gemma3-270m-bible-en-es
$MTP analyze --model gemma3-270m --data austen --tokens 4096 --out results/gemma3-270m-austen
eval_cell austen
eval_cell bible-en-es
$MTP analyze --model gemma3-270m --data bible-en-es --tokens 4096 --out results/gemma3-270m-bible-en-es
