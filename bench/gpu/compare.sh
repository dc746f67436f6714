#!/usr/bin/env bash
# `attnzoo compare` with its GPU defaults on the embedded model, in back-to-back calls (a call
# carries <= 64 MiB with the tree, ~16 MB; the GGUF is 98 MB): split it into parts that fit beside
# the tree and are named gguf.part.* in join order, e.g. `split -n 2` (two calls, 47 MiB each):
#   part a:  bash bench/gpu/compare.sh a          (carry .whl/gguf_a .whl/py)  keeps the parts it carries in /tmp
#            (once per part but the last, each time with the next part in .whl/gguf_a)
#   part b:  bash bench/gpu/compare.sh b [args]   (carry .whl/gguf_b .whl/py)  joins every part, runs compare
# Later calls on the still-warm machine may run `bash bench/gpu/compare.sh c [args]` (no carry):
# the joined GGUF and the converted model stay in /tmp.
set -uo pipefail
PART=${1:?usage: compare.sh a|b|c [compare args...]}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ATTNZOO_CACHE=/tmp/attnzoo-cache
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$PART" = a ]; then
  cp .whl/gguf_a/* /tmp/ && ls -la /tmp/gguf.part.*
  exit 0
fi
if [ "$PART" = b ]; then cp .whl/gguf_b/* /tmp/ && cat /tmp/gguf.part.* > "$GGUF"; fi
md5sum "$GGUF"
python3 -m attnzoo.cli compare --model "$GGUF" --out "$OUT/compare" "$@"
