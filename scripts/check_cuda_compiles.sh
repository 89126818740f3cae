#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with nvcc against the installed torch's headers. Works
# with a CPU-only torch and no GPU: nothing is linked. Usage: check_cuda_compiles.sh [PYTHON]
set -euo pipefail
python=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
nvcc=$(command -v nvcc || true)
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
if [ -z "$nvcc" ]; then
  echo "SKIP cuda compile check: nvcc not found (install the CUDA toolkit to check csrc/cuda/*.cu)"
  exit 0
fi
read -r -a includes < <("$python" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
archs=${MTP_EXT_CHECK_ARCHS:-"-gencode=arch=compute_90,code=sm_90"}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for source in csrc/cuda/*.cu; do
  start=$(date +%s)
  # cuda_cmake_macros.h is generated only in CUDA builds of torch: the define skips it.
  if "$nvcc" -c "$source" -o "$out/$(basename "$source").o" -std=c++20 $archs -O1 \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE --expt-relaxed-constexpr \
      -Xcompiler -fPIC "${includes[@]}"; then
    echo "ok   $source ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL $source"
    status=1
  fi
done
exit $status
