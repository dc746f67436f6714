#!/usr/bin/env bash
# Issue 12's kernel acceptance in one call (no model, no FlashInfer):
#   bash bench/gpu/kernels.sh            (OUT=/tmp/out by default; a device call sets $OUT)
# 1. the XAttention scoring sweep at 128K, D 128, 32/8 heads (pointer loads, TMA tiles, the cuBLAS
#    product read by the kernel; whole calls; TUNE_FLAGS picks), with each stride's whole selector
#    against the torch scorer's plan;
# 2. bench/gpu/run.py's block-sparse, XAttention-estimate, mixed and router sections, the
#    estimate under the sweep's winners (--scores-config), against the fastest dense in-process;
# 3. the kernel tests on the GPU.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout "${TUNE_S:-200}" python3 bench/gpu/tune.py --n 131072 --heads 32 8 --dim 128 --xa-block 128 ${TUNE_FLAGS:---xa-tma --xa-gemm} \
  --only "xattention_scores|selector_xattention" --out "$OUT/tune" 2>&1 | grep -v "^ *$\|UserWarning\|_warn_once"
timeout "${RUN_S:-240}" python3 bench/gpu/run.py --out "$OUT/run" --scores-config "$OUT/tune/tune.json" \
  --sections block_sparse xattention_estimation mixed router --lengths 131072 --budget "${RUN_BUDGET:-200}" \
  2>&1 | grep -v "^ *$" | tail -40
timeout "${GPU_TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -6 \
  | tee "$OUT/pytest-kernels.txt"
