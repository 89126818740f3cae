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
[ -f "$CORPUS" ] || "$PYTHON" "$OUT/mixed_corpus.py" "$CORPUS"
"$PYTHON" -m mtp_ext.cli train-token-head --model smollm2-135m --data "$CORPUS" --out "$OUT" --tokens 200000 \
  --chain 2 --threads "${THREADS:-2}"
