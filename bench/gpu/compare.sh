#!/usr/bin/env bash
# `attnzoo compare` with its GPU defaults on the embedded model, in back-to-back calls (a call
# carries <= 64 MiB with the tree, ~16 MB; the GGUF is 98 MB): split it into parts that fit beside
# the tree and are named gguf.part.* in join order, e.g. `split -n 2` (two calls, 47 MiB each):
#   part a:  bash bench/gpu/compare.sh a          (carry .whl/g1 then .whl/g2, with .whl/py)  keeps the parts it carries in /tmp
#            (once per part but the last, each time with the next part, .whl/g1 then .whl/g2)
#   part b:  bash bench/gpu/compare.sh b [args]   (carry .whl/g3 .whl/py)  joins every part, runs compare
# Later calls on the still-warm machine may run `bash bench/gpu/compare.sh c [args]` (no carry):
# the joined GGUF and the converted model stay in /tmp.
set -uo pipefail
PART=${1:?usage: compare.sh a|b|c [compare args...]}; shift
source "$(dirname "$0")/gguf_env.sh"
if [ "$PART" = a ]; then
  keep_part
  exit 0
fi
if [ "$PART" = b ]; then join_gguf; else md5sum "$GGUF"; fi
python3 -m attnzoo.cli compare --model "$GGUF" --out "$OUT/compare" "$@"
