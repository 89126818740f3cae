#!/usr/bin/env bash
# MTP heads on SmolLM2-135M over Jane Austen, trained to convergence (issue 17): untrained,
# frozen and WHS heads over cached backbone states (one cache of every layer, 2,048 windows of
# 256 tokens, bfloat16, about 19 GB), joint heads on the live backbone. Every line resumes: a
# finished variant is skipped, a stopped one continues from its checkpoint (every 10 steps), a
# cache cut short is completed. Run from the repository root after `make prepare`, in the
# background and niced; copy a finished variant's train.json/train.png with `collect`.
#
#   results/heads/run_convergence.sh           # train whatever is not finished
#   results/heads/run_convergence.sh collect   # copy the finished runs into results/heads/convergence
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
CKPT=${CKPT:-/work/heads-convergence}  # checkpoints and the feature cache stay out of the repository
OUT=results/heads/convergence
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat COMMIT)}
mkdir -p "$OUT" "$CKPT"

common=(--model smollm2-135m --data austen --heads 3 --seq-len 256 --batch-size 8 --eval-tokens 4335 --lr 2e-3
        --checkpoint-every 10 --lr-schedule cosine --shuffle)
# 500 steps x 8 windows x 256 tokens = 1,024,000 tokens: about 2 epochs over the cache
cached=(--train-windows 2048 --warmup-steps 25 --eval-every 25 --features "$CKPT/features" --steps 500)
# 49 steps x 2,048 tokens = 100,352 tokens; a low backbone learning rate protects next-token accuracy
joint=(--joint --backbone-lr 1e-5 --warmup-steps 3 --eval-every 7 --steps 49)

finished() {  # finished DIR STEPS: the run in DIR reached STEPS and wrote its report
  [ -f "$1/train.json" ] && "$PYTHON" -c "import json, sys; sys.exit(json.load(open('$1/train.json'))['training']['step'] < $2)"
}

train() {  # train VARIANT STEPS ARGS...: unless finished, train (or resume), logging the command
  local variant=$1 steps=$2; shift 2
  finished "$CKPT/$variant" "$steps" && return 0
  echo "$(date -u +%FT%TZ) commit $COMMIT, $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores:" \
       "mtp-ext train-heads $* --out $CKPT/$variant" >> "$OUT/commands.log"
  nice -n 19 "$PYTHON" -m mtp_ext.cli train-heads "$@" --out "$CKPT/$variant"
}

collect() {
  for variant in untrained frozen whs joint; do
    [ -f "$CKPT/$variant/train.json" ] || continue
    cp "$CKPT/$variant/train.json" "$OUT/train-$variant.json"
    [ -f "$CKPT/$variant/train.png" ] && cp "$CKPT/$variant/train.png" "$OUT/train-$variant.png"
  done
}

if [ "${1:-}" = collect ]; then collect; exit 0; fi
train untrained 0 "${common[@]}" --steps 0
train whs 500 "${common[@]}" "${cached[@]}" --whs   # builds the cache of every layer, which frozen reuses
train frozen 500 "${common[@]}" "${cached[@]}"
train joint 49 "${common[@]}" "${joint[@]}"
collect
