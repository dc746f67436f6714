#!/usr/bin/env bash
# Issue 38 on one GPU, in back-to-back calls (the GGUF travels in two parts, as in compare.sh):
#   a: (carry .whl/g1 then .whl/g2, with .whl/py) the GPU tests of CUDA-graph replay, the hot path's sync and kernel
#      counts, the split-K decode kernel and decode by the prefill plan -> $OUT/tests.log; the decode
#      attention-only benchmark at 32K and 128K -> $OUT/decode/; keeps the GGUF part in /tmp
#   b: (carry .whl/g3 .whl/py) joins the GGUF; bench/gpu/e2e.py at 8K and 16K, sparse everywhere,
#      every layer call (full's too) replayed from CUDA graphs -> $OUT/e2e-graphs/
#   c: (warm machine, no carry) the same without graphs, for the ratio graphs buy -> $OUT/e2e-eager/
set -uo pipefail
PART=${1:?usage: graphs.sh a|b|c [e2e args...]}; shift
source "$(dirname "$0")/gguf_env.sh"
PRESETS="full streaming xattention topk-blocks elastic-fa-xa token-sparse token-sparse-xattention"
if [ "$PART" = a ]; then
  keep_part
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_hot_path.py \
      tests/test_decode_reuse.py "tests/test_kernels.py::test_triton_split_decode_matches_reference" \
      "tests/test_kernels.py::test_triton_split_decode_empty_rows_and_prefill_declined" -rs 2>&1 \
      | tee "$OUT/tests.log" | tail -30
  # issue 39: one decode step's attention (Quest 1K/2K/4K through the split-K kernel) vs dense, eager and captured
  timeout 200 python3 bench/gpu/decode.py --out "$OUT/decode" --lengths 32768 131072 --reps 30 2>&1 | tail -4
  exit 0
fi
if [ "$PART" = b ]; then join_gguf; fi
if [ "$PART" = b ]; then FLAG=--cuda-graphs; DIR=e2e-graphs; else FLAG=; DIR=e2e-eager; fi
python3 bench/gpu/e2e.py --gguf "$GGUF" --out "$OUT/$DIR" --lengths 8192 16384 --reps 3 --sparse-everywhere \
    --presets $PRESETS $FLAG "$@" 2>&1 | grep -v Warning | tail -60
