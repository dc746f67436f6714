#!/usr/bin/env bash
# Issue 34 item 4 in one call: SSA on the embedded model, measured before and after with the
# fidelity instruments. The GGUF must be joined in /tmp: carry .whl/g3 .whl/py after two calls of
# `bash bench/gpu/compare.sh a` (carrying .whl/g1, then .whl/g2) on the same warm machine.
#   bash bench/gpu/ssa_run.sh [steps]
# 1. before: `attnzoo compare --evals copy --sparse-everywhere` on full / topk-blocks / xattention
#    (copy accuracy per length with full's own, KL and top-1 on plain text, attention recall)
# 2. `attnzoo train ssa`: topk-blocks as the sparse branch, every weight (fp32, bf16 autocast), 8K samples
#    (the model's native context: no YaRN baked into the saved weights), half the retrieval samples copy prompts
# 3. after: the same compare on the aligned model (/tmp/ssa/model)
# Files back: before/ and after/ (results.md, results.json), log.jsonl and training.png of the run.
# A smoke run on a CPU: MODEL=embedded DEVICE=cpu LENGTHS=512 COPY=1024 PER=1 BATCH=1 bash bench/gpu/ssa_run.sh 1
set -uo pipefail
STEPS=${1:-150}
source "$(dirname "$0")/gguf_env.sh"
MODEL=${MODEL:-$GGUF}; DEVICE=${DEVICE:-cuda}
LENGTHS=${LENGTHS:-8192}; COPY=${COPY:-8192,16384,32768}; PER=${PER:-4}; BATCH=${BATCH:-4}
if [ "$MODEL" = "$GGUF" ] && [ ! -f "$GGUF" ]; then join_gguf; fi
run_compare() {
  python3 -m attnzoo.cli compare --model "$1" --device "$DEVICE" --evals copy --sparse-everywhere \
    --copy-lengths "$COPY" --copy-per-cell "$PER" --presets topk-blocks,xattention --out "$2" 2>&1 \
    | tr "\r" "\n" | grep -v -E "Warning|prompt/s|s/prompt|it/s" | tail -30
}
t0=$SECONDS
# SKIP_BEFORE=1: the before half is already measured at these settings (same prompts: seeded)
[ "${SKIP_BEFORE:-0}" = 1 ] || { run_compare "$MODEL" "$OUT/before"; echo "before: $((SECONDS - t0)) s"; }
python3 -m attnzoo.cli train ssa --model "$MODEL" --device "$DEVICE" --dtype float32 --stack topk-blocks --steps "$STEPS" \
  --batch "$BATCH" --lengths "$LENGTHS" --samples $((STEPS * BATCH)) --copy-share 0.5 --out /tmp/ssa 2>&1 \
  | tr '\r' '\n' | grep -v -E "it/s|s/it" | tail -5
cp /tmp/ssa/log.jsonl /tmp/ssa/training.png "$OUT/" 2>/dev/null
echo "training: $((SECONDS - t0)) s"
run_compare /tmp/ssa/model "$OUT/after"; echo "total: $((SECONDS - t0)) s"
