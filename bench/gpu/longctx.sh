#!/usr/bin/env bash
# Long-context presets on the GPU (issue 17 item 4), in three back-to-back calls on one warm machine:
#   part a:  bash bench/gpu/longctx.sh a   (carry .whl/gguf_a .whl/py)  keeps GGUF part 1 in /tmp; GPU tests,
#            backward and program-order timings, a router-training smoke (BWD=0 / TAIL=0 / SMOKE=0 skip them)
#   part b:  bash bench/gpu/longctx.sh b   (carry .whl/gguf_b .whl/py)  joins it; in parallel:
#            per-head XAttention thresholds and Token Sparse layers on the YaRN x4 model
#            (bench/calibrate_presets.py, a density budget picks the recall; with CALIBRATE=1) and
#            one Elastic router per sparse mode (bench/train_router.py: xattention, streaming);
#            writes $OUT/train.tgz and the elastic presets with the new routers to /tmp/candidates
#   part cal: bash bench/gpu/longctx.sh cal  (carry .whl/gguf_b .whl/py)  instead of b: thresholds with the
#            per-text taus combined by median and by mean (AGGREGATES), presets in /tmp/cal-AGG
#   part j:  bash bench/gpu/longctx.sh j   (carry .whl/gguf_b .whl/py)  joins the GGUF and converts it, only
#   part r:  bash bench/gpu/longctx.sh r xattention|streaming  (carry .whl/gguf_b .whl/py; or after part j,
#            .whl/py and .whl/ckpt-MODE from a previous call)  one router's 300-step schedule, resumable: each call trains
#            for TRAIN_MIN minutes from the checkpoint it carries and returns the new one in 15 MB parts
#            ($OUT/ckpt.part.*: a returned file may hold 16 MiB) with log.jsonl, summary.json, router.pt
#   part c:  bash bench/gpu/longctx.sh c COMPARE-ARGS   `attnzoo compare` (GPU defaults, 45 prompts),
#            e.g. --presets full,/tmp/candidates/elastic-fa-xa.yaml [--sparse-everywhere]
set -uo pipefail
PART=${1:?usage: longctx.sh a|b|c}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ATTNZOO_CACHE=/tmp/attnzoo-cache
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
# The GGUF from part a's half in /tmp and the carried half; once per machine. A machine left idle
# between calls (30 s) comes back fresh: part 1 is gone, and joining part 2 alone (as this script
# once did) leaves a file every later part takes for the model.
join_gguf() {
  [ -f "$GGUF" ] && return 0
  [ -f /tmp/gguf.part.aa ] || { echo "GGUF part 1 is not in /tmp (a fresh machine?): run part a again"; exit 1; }
  cat /tmp/gguf.part.aa .whl/gguf_b/gguf.part.ab > "$GGUF.part" && mv "$GGUF.part" "$GGUF" && md5sum "$GGUF"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null
if [ "$PART" = a ]; then
  cp .whl/gguf_a/* /tmp/ && ls -la /tmp/gguf.part.*
  # Triton kernel tests on this GPU (GPU_TESTS: a pytest -k expression; the whole attention-kernel
  # set took 256 s of device time, mostly compiling), then the backward kernels timed (BWD=0 skips)
  python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_training.py \
    -k "${GPU_TESTS:-key_major or micro}" 2>&1 | tail -3
  [ "${BWD:-1}" = 1 ] && python3 bench/gpu/backward.py --out "$OUT" 2>&1 | tail -14
  # the forward kernel's program order with and without a dense tail (TAIL=0 skips)
  [ "${TAIL:-1}" = 1 ] && python3 bench/gpu/tail_balance.py --out "$OUT" 2>&1 | tail -4
  # smoke: two router-training steps per sparse mode on a tiny bf16 Llama on this GPU (SMOKE=0 skips)
  [ "${SMOKE:-1}" = 1 ] || exit 0
  python3 - <<'EOF'
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from attnzoo.training import train_elastic
from attnzoo.training.data import Sample
sys.path.insert(0, "bench")
from train_router import SPARSE
cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
ids = torch.randint(0, 128, (1, 2048))
labels = ids.clone(); labels[:, :-16] = -100
samples = [Sample("retrieval", ids, labels), Sample("other", ids, labels)]
for mode, sparse in SPARSE.items():
    _, log = train_elastic(model, samples, sparse=sparse, steps=2, batch=2, progress=False, micro_batch_tokens=4096)
    print(mode, "ok", {k: round(v, 3) for k, v in log.rows[-1].items() if isinstance(v, float)})
EOF
  exit 0
fi
if [ "$PART" = cal ]; then  # thresholds per aggregation over texts, in parallel (after part a, instead of b)
  join_gguf
  python3 -c "from attnzoo.models import load_model; load_model('$GGUF')" 2>&1 | grep -v "Loading\|Convert\|Writing"
  for AGG in ${AGGREGATES:-median mean}; do
    ( python3 bench/calibrate_presets.py --model "$GGUF" --device cuda --context 32768 --lengths 8192 16384 32768 \
        --target-recall 0.95 0.9 0.8 0.7 0.6 0.5 --max-density 0.3 --aggregate $AGG --presets-dir /tmp/cal-$AGG 2>&1 \
        | grep -v "Loading\|calibrating thr" > "$OUT/calibrate-$AGG.log"
      sed -i "s/^name: xattention-calibrated$/name: xattention-calibrated-$AGG/" /tmp/cal-$AGG/xattention-calibrated.yaml
      cp /tmp/cal-$AGG/xattention-calibrated.yaml "$OUT/xattention-calibrated-$AGG.yaml"
      cp /tmp/cal-$AGG/calibration/smollm2-xattention-thresholds.yaml "$OUT/thresholds-$AGG.yaml" ) &
  done
  wait
  tail -n 4 "$OUT"/calibrate-*.log
  exit 0
fi
if [ "$PART" = j ]; then  # join the GGUF only (carry .whl/gguf_b): a later part r may then carry a checkpoint
  # instead (GGUF part 2 + a router checkpoint exceed the 64 MiB a call carries)
  join_gguf
  python3 -c "from attnzoo.models import load_model; load_model('$GGUF')" 2>&1 | grep -v "Loading\|Convert\|Writing"
  exit 0
fi
if [ "$PART" = r ]; then  # one router, its schedule over several calls (after part a on a warm machine)
  MODE=${1:?usage: longctx.sh r xattention|streaming}
  join_gguf
  T=/tmp/train/router-$MODE; mkdir -p $T
  RESUME=()
  if ls .whl/ckpt-$MODE/ckpt.part.* > /dev/null 2>&1; then
    cat .whl/ckpt-$MODE/ckpt.part.* > /tmp/resume-$MODE.pt && RESUME=(--resume /tmp/resume-$MODE.pt)
  fi
  python3 bench/train_router.py --model "$GGUF" --device cuda --context 32768 --lengths 4096 8192 12288 16384 \
    --steps 300 --batch 16 --samples 320 --lr 1e-3 --lambda-lr 0.02 --held-out 12 --held-out-length 8192 \
    --max-minutes ${TRAIN_MIN:-7.5} --checkpoint-every 10 --micro-batch-tokens ${MICRO:-65536} \
    --sparse $MODE --out $T "${RESUME[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v "^$" | tail -3
  [ -f $T/checkpoint.pt ] && split -b 15M $T/checkpoint.pt "$OUT/ckpt.part."
  cp $T/log.jsonl $T/summary.json $T/training.png $T/router.pt "$OUT/" 2>/dev/null
  exit 0
fi
if [ "$PART" = b ]; then
  join_gguf
  # convert once before the parallel jobs (they would race on the model cache)
  python3 -c "from attnzoo.models import load_model; load_model('$GGUF')" 2>&1 | grep -v Loading
  TRAIN="--model $GGUF --device cuda --context 32768 --lengths 4096 8192 12288 16384 --steps 300 --batch 16
         --samples 320 --lr 1e-3 --lambda-lr 0.02 --held-out 12 --held-out-length 8192 --max-minutes ${TRAIN_MIN:-7.5}
         --micro-batch-tokens 32768"
  T=/tmp/train; mkdir -p $T
  python3 bench/train_router.py $TRAIN --sparse xattention --out $T/router-xa > $T/router-xa.log 2>&1 &
  python3 bench/train_router.py $TRAIN --sparse streaming --out $T/router-streaming > $T/router-streaming.log 2>&1 &
  [ -n "${CALIBRATE:-}" ] && python3 bench/calibrate_presets.py --model "$GGUF" --device cuda --context 32768 \
    --lengths 8192 16384 32768 --target-recall 0.95 0.9 0.8 0.7 0.6 0.5 --max-density 0.3 \
    --token-sparse-dense-below 65536 --presets-dir "$OUT/candidates" 2>&1 | grep -v "Loading\|calibrating thr" \
    | tee "$OUT/calibrate.log"
  wait
  for f in $T/router-*.log; do tr '\r' '\n' < $f | grep -v "^$" | tail -2; done
  # one archive: a call brings back only a handful of files
  tar czf "$OUT/train.tgz" -C /tmp train && ls -la "$OUT/train.tgz"
  mkdir -p "$OUT/candidates"
  python3 - "$OUT" <<'EOF'
import shutil, sys
from pathlib import Path
from attnzoo.config import dump_config, load_config
out = Path(sys.argv[1])
# the shipped elastic presets with the routers trained here (router-xa for FA-XA, router-streaming
# for the two streaming modes); everything else as shipped
for preset, router in (("elastic-fa-xa", "router-xa"), ("elastic-fa-streaming", "router-streaming"),
                       ("elastic-xa-streaming", "router-streaming")):
    spec = load_config(f"preset:{preset}")
    if Path(f"/tmp/train/{router}/router.pt").is_file():
        spec["default"]["router"]["weights"] = f"/tmp/candidates/{router}.pt"
    (out / "candidates" / f"{preset}.yaml").write_text(dump_config(spec))
shutil.rmtree("/tmp/candidates", ignore_errors=True)
shutil.copytree(out / "candidates", "/tmp/candidates")
for router in ("router-xa", "router-streaming"):
    if Path(f"/tmp/train/{router}/router.pt").is_file():
        shutil.copy(f"/tmp/train/{router}/router.pt", f"/tmp/candidates/{router}.pt")
print(sorted(p.name for p in Path("/tmp/candidates").iterdir()))
EOF
  exit 0
fi
python3 -m attnzoo.cli compare --model "$GGUF" --out "$OUT/compare" "$@"
