#!/usr/bin/env bash
# The GPU run in one command (see bench/gpu/run.py):
#   bash bench/gpu/run.sh OUT_DIR [run.py args...]
# Installs carried wheels from .whl/ (flashinfer-python, apache-tvm-ffi; the GPU image has neither),
# points FlashInfer's JIT at the CUDA toolkit, runs the checks and benchmarks, then the kernel
# tests on the GPU.
set -uo pipefail
OUT=${1:?usage: run.sh OUT_DIR [args]}; shift
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
if [ -n "$NVCC" ]; then
  export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  export PATH=$CUDA_HOME/bin:$PATH
fi
LIBCUDA=$(ls /usr/local/nvidia/lib64/libcuda.so.* /usr/lib/x86_64-linux-gnu/libcuda.so.* 2>/dev/null | head -1)
if [ -n "$LIBCUDA" ]; then
  mkdir -p /tmp/libcuda && ln -sf "$LIBCUDA" /tmp/libcuda/libcuda.so
  export LIBRARY_PATH=/tmp/libcuda${LIBRARY_PATH:+:$LIBRARY_PATH}
fi
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-$PWD/.fi-cache}  # kept while the machine stays warm
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "CUDA_HOME=${CUDA_HOME:-?} libcuda=${LIBCUDA:-?}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 bench/gpu/run.py --out "$OUT" "$@"
rc=$?
# then the kernel test-suite on the GPU (fp32 / fp16 / bf16, every mode, padding), within ${GPU_TEST_S:-150} s
timeout "${GPU_TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15 \
  | tee "$OUT/pytest-kernels.txt"
exit $rc
