#!/usr/bin/env bash
# Issue 34's Elastic criterion on one GPU, in one call after the GGUF is joined in /tmp (two calls of
# `bash bench/gpu/compare.sh a`, or keep_part, carrying .whl/g1 then .whl/g2; this call carries .whl/g3 .whl/py):
#   bash bench/gpu/router_prior.sh
# 1. bench/train_router.py on the YaRN-extended embedded model: route_prior (the router learns each
#    task type's sparsity target from its input alone) then the paper's recipe, copy prompts as half
#    the retrieval samples, 4K / 8K samples, XAttention branch (elastic-fa-xa's)
# 2. bench/router_share.py at 8K on held-out copy prompts and plain text: the retrained router and
#    the shipped one (criterion: copy share >= text share + 0.15)
# 3. attnzoo compare --evals copy at 8K / 16K: both routers' copy accuracy, KL, density
# Files back: summary.json, log.jsonl, training.png, share.md, compare/results.md
set -uo pipefail
source "$(dirname "$0")/gguf_env.sh"
[ -f "$GGUF" ] || join_gguf
T=/tmp/router-prior; mkdir -p $T
t0=$SECONDS
python3 bench/train_router.py --model "$GGUF" --device cuda --context 32768 --sparse xattention \
  --lengths 4096 8192 --steps "${STEPS:-120}" --batch 8 --samples 480 --copy-share 0.5 --prior-steps "${PRIOR:-200}" \
  --lr 1e-3 --lambda-lr 0.02 --held-out 8 --held-out-length 8192 --micro-batch-tokens 65536 \
  --max-minutes "${TRAIN_MIN:-5}" --out $T 2>&1 | tr '\r' '\n' | grep -v -E "^$|it/s|s/it" | tail -3
echo "training: $((SECONDS - t0)) s"
cp $T/summary.json $T/log.jsonl $T/training.png "$OUT/" 2>/dev/null
sed "s#weights: ROUTER.pt#weights: $T/router.pt#; s#^name: .*#name: elastic-fa-xa-prior#" \
  bench/results/2026-12-07-cpu-router-prior/elastic-fa-xa-prior.yaml > /tmp/elastic-fa-xa-prior.yaml
for p in /tmp/elastic-fa-xa-prior.yaml elastic-fa-xa; do
  python3 bench/router_share.py --preset $p --model "$GGUF" --device cuda --lengths 8192 --prompts 8 2>&1 \
    | grep -v -i warn | tee -a "$OUT/share.md"
done
echo "shares: $((SECONDS - t0)) s"
python3 -m attnzoo.cli compare --model "$GGUF" --out "$OUT/compare" --evals copy --sparse-everywhere \
  --copy-lengths 8192,16384 --copy-per-cell 4 --presets elastic-fa-xa,/tmp/elastic-fa-xa-prior.yaml 2>&1 \
  | tr "\r" "\n" | grep -v -E "Warning|prompt/s|s/prompt|it/s" | tail -12
echo "total: $((SECONDS - t0)) s"
