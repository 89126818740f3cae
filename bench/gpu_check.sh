#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine from the repository root (device tool):
# build with CUDA, run the CUDA tests, run the GPU benchmarks, write results under $OUT.
#   OUT=/tmp/out bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
log() { echo "== $* ($(date +%T))"; }

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -2; which c++ g++ gcc; c++ --version | head -1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } 2>&1 | tee "$OUT/machine.txt"

build() {  # $1: the C++ compiler, $2: MTP_EXT_NATIVE (1: AVX2/AVX-512 host code)
  rm -rf build mtp_ext/_C*.so
  CXX=$1 MTP_EXT_NATIVE=${2:-1} MTP_EXT_CUDA=1 $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; return 1; }
  $PY -c "import mtp_ext; print(mtp_ext.build_info())"
}

# An error message with a number in it crashed the process here once (g++ 13 from /opt/gcc,
# 2026-11-27): probe it, and rebuild with the system compiler if it does.
error_paths_work() {
  $PY -c "import torch, mtp_ext
try: mtp_ext.top_p_candidates(torch.zeros(2, 3, device='cuda'), torch.full((3,), 0.5, device='cuda'))
except (ValueError, RuntimeError) as e: print('error path ok:', str(e)[:80])"
}

log "build with CUDA"
build "${CXX:-c++}" | tee -a "$OUT/machine.txt"
if ! error_paths_work; then
  echo "error path crashed with $(command -v c++); rebuilding with /usr/bin/g++" | tee -a "$OUT/machine.txt"
  build /usr/bin/g++ | tee -a "$OUT/machine.txt"
  if ! error_paths_work; then
    echo "still crashing; rebuilding without AVX2/AVX-512 host flags" | tee -a "$OUT/machine.txt"
    build /usr/bin/g++ 0 | tee -a "$OUT/machine.txt"
    error_paths_work | tee -a "$OUT/machine.txt"
  fi
fi

log "tests: the CUDA-marked ones, then everything else that needs no real weights"
$PY -m pytest python_tests -q -m cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log" | tail -15
$PY -m pytest python_tests -q -m "not cuda and not slow" -p no:cacheprovider -x 2>&1 | tee "$OUT/tests_cpu.log" | tail -5

log "benchmarks"
(cd bench && $PY -m pytest bench_top_p.py bench_marginal.py bench_multihead.py -q -k cuda -p no:cacheprovider \
   --benchmark-json="$OUT/bench_cuda.json" > "$OUT/bench_cuda.log" 2>&1; tail -3 "$OUT/bench_cuda.log")
$PY bench/summarize.py "$OUT/bench_cuda.json" | tee "$OUT/bench_cuda.md"

log "pass costs on the GPU (random weights of SmolLM2's config), batch 1 and 8; the lookup ladders replayed on them"
for batch in 1 8; do
  BENCH_DEVICE=cuda BENCH_BATCH=$batch $PY -m pytest bench/bench_pass_cost.py -q -p no:cacheprovider \
    --benchmark-json="$OUT/pass-cost-cuda-batch$batch.json" > "$OUT/pass-cost-cuda-batch$batch.log" 2>&1
  tail -1 "$OUT/pass-cost-cuda-batch$batch.log"
  $PY bench/summarize.py "$OUT/pass-cost-cuda-batch$batch.json" | tee -a "$OUT/bench_cuda.md"
done
$PY bench/lookup_acceptance.py "$OUT/lookup-acceptance-cuda.json" \
  --pass-cost "$OUT/pass-cost-cuda-batch1.json" "$OUT/pass-cost-cuda-batch8.json" 2>&1 | tee "$OUT/lookup-acceptance-cuda.log"
log "done"
