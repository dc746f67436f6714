#!/usr/bin/env bash
# The GPU fuzz campaign (issue 37): every CUDA backend forced in turn against the fp32 reference,
# selectors through their ops, stacks and the shipped presets in small models, all on the GPU.
# One call, no carry: bash bench/gpu/fuzz.sh [seed]   (report: $OUT/fuzz-gpu.md)
# SIGINT at 540 s lets pytest finish its session, so the report still lists what was checked.
set -uo pipefail
SEED=${1:-20261207}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ATTNZOO_FUZZ=gpu ATTNZOO_FUZZ_REPORT="$OUT/fuzz-gpu.md"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'hypothesis', hypothesis.__version__)"
git rev-parse HEAD 2>/dev/null || true
t0=$SECONDS
timeout -s INT 540 python3 -m pytest tests/fuzz -q -p no:cacheprovider --hypothesis-seed="$SEED" --tb=short 2>&1 | tee "$OUT/fuzz-gpu.log" | tail -80
echo "fuzz: $((SECONDS - t0)) s"
