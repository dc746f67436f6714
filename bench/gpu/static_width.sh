#!/usr/bin/env bash
# Issue 38's sync-free Token Sparse (dense row_lengths / triton_rows) and issue 39's captured decode, on one GPU in
# back-to-back calls (the GGUF travels in three parts, see gguf_env.sh):
#   a: (carry .whl/g1 .whl/py) GPU tests of row lengths, graph replay (the shipped token-sparse captured), the hot
#      path's syncs, the decode kernels; one Token Sparse layer call's parts (token_sparse_parts.py); 
#      bench/gpu/decode_graph.py on random weights -> $OUT/tests.log, $OUT/parts.md, $OUT/g/
#   b: (carry .whl/g2) keeps the second part
#   c: (carry .whl/g3 .whl/py) joins the GGUF; bench/gpu/e2e.py at 8K / 16K / 64K, sparse everywhere, CUDA graphs:
#      full, token-sparse (static width) and the read-width variant of the record -> $OUT/e2e/
#   d: (warm machine) bench/gpu/decode_graph.py on the embedded model -> $OUT/dg/
#   v: (carry .whl/g1 .whl/py) the GPU tests again (after fixes) and one Token Sparse layer call's parts at 128K at
#      the kept share of the real model's density there (0.773^2 = 0.597) -> $OUT/tests.log, $OUT/parts-128k.md
#   e: (after v and b; carry .whl/g3 .whl/py) joins the GGUF; bench/gpu/e2e.py at 128K, full and token-sparse -> $OUT/e2e/
set -uo pipefail
PART=${1:?usage: static_width.sh a|b|c|d|v|e}; shift
source "$(dirname "$0")/gguf_env.sh"
REC=bench/results/2026-12-07-h100-token-sparse-static
case "$PART" in
a) keep_part >/dev/null
   timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_row_lengths.py tests/test_graphs.py \
       tests/test_ops_backends.py -k "not block_sparse" "tests/test_hot_path.py::test_gpu_prefill_host_syncs" 2>&1 \
       | tee "$OUT/tests.log" | tail -12
   timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
       -k "top_n or page_scores or split_decode or dense or mixed" 2>&1 | tee -a "$OUT/tests.log" | tail -3
   timeout 90 python3 bench/gpu/token_sparse_parts.py 2>&1 | tee "$OUT/parts.md" | tail -6
   timeout 120 python3 bench/gpu/decode_graph.py --random-weights --out "$OUT/g" --lengths 131072 32768 \
       --budgets 1024 4096 --new-tokens 32 2>&1 | tail -25 ;;
b) keep_part ;;
c) join_gguf
   python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/e2e" --lengths 8192 16384 65536 --reps 3 --sparse-everywhere \
       --cuda-graphs --distinct-prompts 2 --presets full token-sparse "$REC/token-sparse-read-width.yaml" "$@" 2>&1 \
       | grep -v Warning | tail -60 ;;
v) keep_part >/dev/null
   timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_row_lengths.py tests/test_graphs.py \
       "tests/test_hot_path.py::test_gpu_prefill_host_syncs" -k "not elastic" --tb=short 2>&1 | tee "$OUT/tests.log" \
       | grep -v "^SKIPPED" | tail -15
   timeout 120 python3 bench/gpu/token_sparse_parts.py --lengths 131072 --kept 0.773 2>&1 | tee "$OUT/parts-128k.md" ;;
e) join_gguf
   python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/e2e" --lengths 131072 --reps 3 --cuda-graphs \
       --presets full token-sparse "$@" 2>&1 | grep -v Warning | tail -20 ;;
d) python3 bench/gpu/decode_graph.py --gguf "$GGUF" --out "$OUT/dg" --lengths 32768 65536 131072 \
       --budgets 1024 4096 "$@" 2>&1 | tail -40 ;;
esac
