#!/usr/bin/env bash
# Issue 38 at every length, on one GPU in back-to-back calls (the GGUF travels in three parts, see gguf_env.sh):
#   t: (carry .whl/g1 .whl/py) GPU tests of graphs, row lengths and the hot path's syncs; one Token Sparse layer
#      call's parts at 128K at the real model's kept share there (0.773^2 = 0.597) -> $OUT/tests.log, $OUT/parts-128k.md
#   k: (carry .whl/g2) keeps the second part
#   s: (carry .whl/g3 .whl/py) joins the GGUF; bench/gpu/e2e.py at 8K and 16K, every preset shipped and sparse
#      everywhere, CUDA graphs (dense layers run eagerly: one launch) -> $OUT/e2e-short/
#   l: (warm machine, after s) bench/gpu/e2e.py at 128K, every preset, CUDA graphs -> $OUT/e2e-128k/
set -uo pipefail
PART=${1:?usage: every_length.sh t|k|s|l}; shift
source "$(dirname "$0")/gguf_env.sh"
ALL="full streaming xattention topk-blocks elastic-fa-xa token-sparse token-sparse-xattention"
case "$PART" in
t) keep_part >/dev/null
   timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_row_lengths.py tests/test_graphs.py \
       "tests/test_hot_path.py::test_gpu_prefill_host_syncs" -k "not elastic" --tb=short 2>&1 | tee "$OUT/tests.log" \
       | grep -v "^SKIPPED" | tail -15
   timeout 120 python3 bench/gpu/token_sparse_parts.py --lengths 131072 --kept 0.773 2>&1 | tee "$OUT/parts-128k.md" ;;
k) keep_part ;;
s) join_gguf
   timeout 560 python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/e2e-short" --lengths 8192 16384 --reps 3 \
       --sparse-everywhere --cuda-graphs --distinct-prompts 2 --presets $ALL "$@" 2>&1 | grep -v Warning | tail -40 ;;
l) timeout 560 python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/e2e-128k" --lengths 131072 --reps 3 --cuda-graphs \
       --presets $ALL "$@" 2>&1 | grep -v Warning | tail -25 ;;
esac
