#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine from the repository root (device tool):
# build with CUDA, run the CUDA tests, run the GPU benchmarks, write results under $OUT.
#   OUT=/tmp/out bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "== $* ($(date +%T))"; }

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
{ nvcc --version | tail -2; $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; git rev-parse HEAD 2>/dev/null || echo "commit: see caller"; } | tee -a "$OUT/machine.txt"

log "build with CUDA"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
MTP_EXT_CUDA=1 MAX_JOBS=16 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
$PY -c "import mtp_ext; print(mtp_ext.build_info())" | tee -a "$OUT/machine.txt"

log "tests (CUDA-marked, then the op tests on both backends)"
$PY -m pytest python_tests -q -x -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log" | tail -15
$PY -m pytest python_tests -q -p no:cacheprovider -m "not slow" --ignore=python_tests/test_models_data.py 2>&1 | tee "$OUT/tests_all.log" | tail -8

log "benchmarks"
(cd bench && $PY -m pytest . -q -k cuda -p no:cacheprovider --benchmark-json="$OUT/bench_cuda.json" \
   --benchmark-columns=median,iqr,rounds > "$OUT/bench_cuda.log" 2>&1; tail -3 "$OUT/bench_cuda.log")
$PY bench/summarize.py "$OUT/bench_cuda.json" | tee "$OUT/bench_cuda.md"
log "done"
