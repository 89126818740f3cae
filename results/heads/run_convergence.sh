#!/usr/bin/env bash
# MTP heads on SmolLM2-135M over Jane Austen, trained to convergence (issue 17): untrained,
# frozen and WHS heads over cached backbone states (one cache of every layer, 2,048 windows of
# 256 tokens, bfloat16, about 19 GB), joint heads on the live backbone; then their held-out
# accuracy beside marginalisation (steps 1-4, 4,335 positions, intervals; findings.md decides the
# paper's claims from the paired differences), and marginalisation at
# step 2 with 256 candidates per node for both models and both tasks (tighter bounds). Every
# line resumes: a finished part is skipped, a stopped training continues from its checkpoint
# (every 10 steps), a cache cut short is completed, an evaluation goes on from its parts file.
# Run from the repository root after `make prepare MODELS="smollm2-135m gemma3-270m"`, in the
# background and niced; RESULTS says where the results go (a copy of the repository can run
# the code while the results land in the working tree).
#
#   results/heads/run_convergence.sh           # run whatever is not finished
#   results/heads/run_convergence.sh collect   # copy the finished trainings into RESULTS/heads/convergence
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
CKPT=${CKPT:-/work/heads-convergence}  # checkpoints and the feature cache stay out of the repository
RESULTS=${RESULTS:-results}
OUT=$RESULTS/heads/convergence
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

mtp() {  # mtp COMMAND ARGS...: run `mtp-ext COMMAND ARGS...` niced, logging it with the commit and the CPU
  echo "$(date -u +%FT%TZ) commit $COMMIT, $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores:" \
       "mtp-ext $*" >> "$OUT/commands.log"
  nice -n 19 "$PYTHON" -m mtp_ext.cli "$@"
}

train() {  # train VARIANT STEPS ARGS...: unless finished, train (or resume)
  local variant=$1 steps=$2; shift 2
  finished "$CKPT/$variant" "$steps" || mtp train-heads "$@" --out "$CKPT/$variant"
}

bounds() {  # bounds MODEL DATA: marginalisation at step 2 with 256 candidates per node, 1,024 positions
  local json=$RESULTS/$1-$2/eval-step2-cap256.json
  [ -f "$json" ] || mtp eval --model "$1" --data "$2" --steps 2 --top-p 0.99 --max-candidates 256 --max-nodes 256 \
    --tokens 1024 --json "$json"
}

collect() {
  for variant in untrained frozen whs joint; do
    [ -f "$CKPT/$variant/train.json" ] || continue
    cp "$CKPT/$variant/train.json" "$OUT/train-$variant.json"
    if [ -f "$CKPT/$variant/train.png" ]; then cp "$CKPT/$variant/train.png" "$OUT/train-$variant.png"; fi
  done
}

if [ "${1:-}" = collect ]; then collect; exit 0; fi
train untrained 0 "${common[@]}" --steps 0
train whs 500 "${common[@]}" "${cached[@]}" --whs   # builds the cache of every layer, which frozen reuses
train frozen 500 "${common[@]}" "${cached[@]}"
train joint 49 "${common[@]}" "${joint[@]}"
collect
[ -f "$OUT/eval-heads.json" ] || mtp eval-heads --model smollm2-135m --data austen --seq-len 256 --tokens 4335 \
  --marginal-steps 4 --max-candidates 16 --max-nodes 64 \
  --heads-dir "$CKPT/untrained" "$CKPT/frozen" "$CKPT/whs" "$CKPT/joint" \
  --json "$OUT/eval-heads.json" --plot "$OUT/fig5.png"
"$PYTHON" results/heads/findings.py "$OUT/eval-heads.json" > "$OUT/findings.md"
for model in smollm2-135m gemma3-270m; do
  for data in austen bible-en-es; do bounds "$model" "$data"; done
done
