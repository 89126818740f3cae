#!/usr/bin/env bash
# The heads of results/vllm/: two "medusa" heads (vLLM's Medusa layout) on SmolLM2-135M, trained
# in two stages on a frozen backbone, then exported for vLLM with a draft vocabulary of Austen's
# 8,192 most frequent tokens:
#   1. self-distilled (--targets model) over Austen's text, from cached last-layer states;
#   2. from there, on the model's own greedy continuations of Austen (greedy_text.py, run by
#      vLLM in .venv-vllm), which is what greedy speculative decoding asks the heads to guess.
# Run from the repository root after `make prepare` and `make vllm-env`, niced; checkpoints, the
# feature cache (300 MB) and the generated text stay outside the repository in $CKPT, and only
# the heads (without the optimizer state) are copied in.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
CKPT=${CKPT:-/work/vllm-heads}
OUT=results/vllm
train=(nice -n 19 "$PYTHON" -m mtp_ext.cli train-heads --model smollm2-135m --heads 2 --head-type medusa
       --targets model --seq-len 256 --batch-size 4 --shuffle --lr 2e-3 --lr-schedule cosine --checkpoint-every 10
       --eval-tokens 1024 --threads 1)
"${train[@]}" --data austen --train-windows 512 --warmup-steps 20 --steps 120 --eval-every 40 \
  --features "$CKPT/features" --out "$CKPT/medusa"
[ -f "$CKPT/greedy-austen.jsonl" ] || nice -n 19 "$VLLM_PYTHON" "$OUT/greedy_text.py" "$CKPT/greedy-austen.jsonl" 320 200
"${train[@]}" --data "$CKPT/greedy-austen.jsonl" --train-windows 288 --warmup-steps 5 --steps 72 --eval-every 24 \
  --init-from "$CKPT/medusa" --out "$CKPT/medusa-greedy"
mkdir -p "$OUT/medusa"
cp "$CKPT"/medusa-greedy/{heads.safetensors,heads_config.json,train.json,train.png} "$OUT/medusa/"
cp "$CKPT/medusa/train.json" "$OUT/medusa/train-stage1.json"
"$PYTHON" -m mtp_ext.cli export-heads "$OUT/medusa" --format vllm-medusa --draft-vocab 8192 --data austen \
  --out "$OUT/medusa-vllm"
