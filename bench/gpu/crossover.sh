#!/usr/bin/env bash
# attnzoo crossover on the GPU for the shipped presets that have a dense_below switch (issue 38 item 3).
# On a warm machine after compare.sh a/b (the joined GGUF in /tmp): bash bench/gpu/crossover.sh [lengths]
set -uo pipefail
LENGTHS=${1:-8192,16384,32768,65536}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ATTNZOO_CACHE=/tmp/attnzoo-cache
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$SECONDS
python3 -m attnzoo.cli crossover --model "$GGUF" --device cuda --lengths "$LENGTHS" --reps 3 --out-dir "$OUT/crossover" \
    --presets streaming,xattention,topk-blocks,elastic-fa-xa,token-sparse,token-sparse-xattention
echo "crossover: $((SECONDS - t0)) s"
