#!/usr/bin/env bash
# Issue 38 at every length, on one GPU in back-to-back calls (the GGUF travels in three parts, see gguf_env.sh):
#   t: (carry .whl/g1 .whl/py) GPU tests: graphs (one-launch calls eager), row lengths, the grouped block-sparse
#      kernel, the pooled scorer's sink/local marks, the hot path's syncs -> $OUT/tests.log
#   k: (carry .whl/g2) keeps the second part
#   s: (carry .whl/g3 .whl/py) joins the GGUF; bench/gpu/e2e.py at 8K and 16K, every preset sparse everywhere,
#      CUDA graphs (dense calls run eagerly: one launch) -> $OUT/e2e-short/
#   l: (warm machine, after s) bench/gpu/e2e.py at 128K, every preset, CUDA graphs -> $OUT/e2e-128k/
#   r: (carry .whl/g1 .whl/py) the top-n cut searches timed (bench/gpu/select_radix.py, the faster kept in
#      /tmp/radix); `r tests` also runs the GPU tests of row lengths and graphs
#   L: (after r and k; carry .whl/g3 .whl/py) joins the GGUF; e2e at 128K, every preset, graphs, with the faster
#      cut search (ATTNZOO_SELECT_RADIX) -> $OUT/e2e-128k/
set -uo pipefail
PART=${1:?usage: every_length.sh t|k|s|l|r|L}; shift
source "$(dirname "$0")/gguf_env.sh"
ALL="full streaming xattention topk-blocks elastic-fa-xa token-sparse token-sparse-xattention"
case "$PART" in
t) keep_part >/dev/null
   timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_row_lengths.py \
       "tests/test_hot_path.py::test_gpu_prefill_host_syncs" -k "not elastic" --tb=short 2>&1 | tee "$OUT/tests.log" \
       | grep -v "^SKIPPED" | tail -12
   timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ops_backends.py \
       -k "grouped or pooled or top_n" --tb=short 2>&1 | tee -a "$OUT/tests.log" | grep -v "^SKIPPED" | tail -6 ;;
k) keep_part ;;
s) join_gguf
   timeout 560 python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/e2e-short" --lengths 16384 8192 --reps 3 \
       --sparse-everywhere --sparse-only --cuda-graphs --presets $ALL "$@" 2>&1 | grep -v Warning | tail -40 ;;
l) timeout 560 python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/e2e-128k" --lengths 131072 --reps 2 --cuda-graphs \
       --presets $ALL "$@" 2>&1 | grep -v Warning | tail -25 ;;
r) keep_part >/dev/null
   timeout 60 python3 bench/gpu/select_radix.py --decide 2>&1 | tee "$OUT/select_radix.md" | tail -6
   tail -1 "$OUT/select_radix.md" > /tmp/radix
   [ "${1:-}" = tests ] && timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_row_lengths.py \
       tests/test_graphs.py -k "not elastic" --tb=short 2>&1 | tee "$OUT/tests.log" | grep -v "^SKIPPED" | tail -4 ;;
L) join_gguf
   ATTNZOO_SELECT_RADIX=$(cat /tmp/radix 2>/dev/null || echo 0) timeout 560 python3 bench/gpu/e2e.py --gguf "$GGUF" \
       --out "$OUT/e2e-128k" --lengths 131072 --reps 2 --cuda-graphs "$@" 2>&1 | grep -v Warning \
       | tail -16 ;;
esac
