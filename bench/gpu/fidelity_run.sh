#!/usr/bin/env bash
# The fidelity acceptance run of issue 34 on one GPU, in back-to-back calls (see compare.sh for the
# GGUF parts; `a` calls are compare.sh's):
#   b: join the GGUF, calibrate XAttention thresholds at 8K-32K on the YaRN-extended model
#      (attnzoo calibrate --density-budget: per-head thresholds keeping the most attention mass at a
#      mean density of $BUDGET, default 0.34; the stack renamed xattention-calibrated-budget, copied
#      to $OUT), then `attnzoo compare --evals copy --sparse-everywhere` on the
#      presets the acceptance names, the long calibration beside them
#   c: (warm machine, no carry) the same compare on the remaining shipped presets
#   d: Token Sparse's coverage fitted to recall $TS_RECALL (0.95) at 16K/32K, XAttention at density
#      budgets $BUDGETS (0.38 0.42: where does plain-text KL reach 0.05?), compared with full
#   e: (warm machine) $E_PRESETS (default topk-blocks) alone, for more prompts per cell than the rest
set -uo pipefail
PART=${1:?usage: fidelity_run.sh b|c|d [per-cell]}; PER=${2:-12}  # 6 gave 95 % intervals of +-0.05-0.085 (2026-12-07): 12 for <= 0.05
source "$(dirname "$0")/gguf_env.sh"
git rev-parse HEAD 2>/dev/null || true
if [ "$PART" = b ]; then
  join_gguf
  t0=$SECONDS
  # thresholds that keep the most attention mass at a mean density of 0.34 (attnzoo.allocation),
  # checked on held-out prompts at the same lengths
  python3 -m attnzoo.cli calibrate --preset xattention-calibrated --model "$GGUF" --device cuda --context 32768 \
      --lengths 8192,16384,32768 --density-budget "${BUDGET:-0.34}" \
      --out /tmp/xattention-calibrated-budget.yaml 2>&1 | grep -v Warning | tr "\r" "\n" | grep -v "it/s\|s/it"
  echo "calibration: $((SECONDS - t0)) s"
  sed -i 's/^name: xattention-calibrated$/name: xattention-calibrated-budget/' /tmp/xattention-calibrated-budget.yaml
  cp /tmp/xattention-calibrated-budget*.yaml "$OUT/"
  # elastic-fa-xa with its XAttention branch at tau 0.97: does a denser sparse branch bring KL to 0.05?
  python3 -c "
from attnzoo.config import dump_config, load_config
s = load_config('preset:elastic-fa-xa'); s['name'] = 'elastic-fa-xa-tau97'
s['default']['branches']['sparse']['selector']['threshold'] = 0.97
open('/tmp/elastic-fa-xa-tau97.yaml', 'w').write(dump_config(s))"
  PRESETS=xattention,xattention-calibrated,/tmp/xattention-calibrated-budget.yaml,streaming,elastic-fa-xa,/tmp/elastic-fa-xa-tau97.yaml,topk-blocks
elif [ "$PART" = d ]; then
  # what issue 34 still misses: Token Sparse's coverage fitted to attention recall at 16K-32K on the
  # YaRN-extended model, and XAttention thresholds at a slightly larger density budget (KL <= 0.05?)
  [ -f "$GGUF" ] || join_gguf
  t0=$SECONDS
  python3 -m attnzoo.cli calibrate --preset token-sparse-calibrated --model "$GGUF" --device cuda --context 32768 \
      --lengths 16384,32768 --target-recall "${TS_RECALL:-0.95}" --out /tmp/token-sparse-fit.yaml 2>&1 | grep -v Warning
  sed -i 's/^name: token-sparse-calibrated$/name: token-sparse-fit/' /tmp/token-sparse-fit.yaml
  PRESETS=/tmp/token-sparse-fit.yaml
  for B in ${BUDGETS:-0.38 0.42}; do
    python3 -m attnzoo.cli calibrate --preset xattention-calibrated --model "$GGUF" --device cuda --context 32768 \
        --lengths 8192,16384,32768 --density-budget "$B" --out "/tmp/xattention-budget-$B.yaml" 2>&1 \
        | grep -v Warning | tr "\r" "\n" | grep -v "it/s\|s/it"
    sed -i "s/^name: xattention-calibrated$/name: xattention-budget-$B/" "/tmp/xattention-budget-$B.yaml"
    PRESETS="$PRESETS,/tmp/xattention-budget-$B.yaml"
  done
  echo "calibration: $((SECONDS - t0)) s"
  cp /tmp/token-sparse-fit*.yaml /tmp/xattention-budget-*.yaml "$OUT/"
elif [ "$PART" = e ]; then
  PRESETS=${E_PRESETS:-topk-blocks}
else
  PRESETS=elastic-fa-streaming,elastic-xa-streaming,router-table-example,token-sparse,token-sparse-calibrated,token-sparse-xattention
fi
t0=$SECONDS
python3 -m attnzoo.cli compare --model "$GGUF" --out "$OUT/compare-$PART" --evals copy --sparse-everywhere \
    --copy-per-cell "$PER" --presets "$PRESETS"
echo "compare: $((SECONDS - t0)) s"
