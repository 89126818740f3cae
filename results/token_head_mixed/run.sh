#!/usr/bin/env bash
# The token head of results/token_head_mixed/: SmolLM2-135M, trained on Austen, Shakespeare and
# the English Bible interleaved (mixed_corpus.py: none of the benchmark's prompt texts), chained
# two levels deep (EAGLE-style: level 2 reads the state level 1 predicted, with feature
# regression). Run from the repository root after `make prepare`; the corpus is written outside
# the repository ($CORPUS).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
CORPUS=${CORPUS:-$HOME/.cache/mtp_ext/data/mixed-en.jsonl}
OUT=${OUT:-results/token_head_mixed}
[ -f "$CORPUS" ] || "$PYTHON" "$(dirname "$0")/mixed_corpus.py" "$CORPUS"
# RESUME: where a long run keeps its features and epochs (--resume-dir), so that a stopped run,
# started again, goes on; TOKENS: the training positions (the committed head: 200,000).
"$PYTHON" -m mtp_ext.cli train-token-head --model smollm2-135m --data "$CORPUS" --out "$OUT" --tokens "${TOKENS:-200000}" \
  --chain 2 --threads "${THREADS:-2}" ${RESUME:+--resume-dir "$RESUME"}
