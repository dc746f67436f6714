#!/usr/bin/env bash
# Issue 37's GPU fuzz campaign in one call: the fuzz targets split over P pytest processes sharing
# the GPU, then their reports summed (bench/gpu/fuzz_merge.py).
#   bash bench/gpu/fuzz_parallel.sh [seed] [deadline_s] [processes]
# Why processes: one process checked ~1 case/s (cuDNN builds a graph per new SDPA shape, Triton
# compiles per new specialisation) -- host-bound work, so 12 processes on the 16 cores go ~10x
# faster, while the GPU stays mostly idle. Each process gets every P-th test id (round robin, after
# the collected order), the same hypothesis seed, and is stopped with SIGINT at the deadline so
# pytest finishes its session and writes the report of what it checked.
set -uo pipefail
SEED=${1:-20261208}; DEADLINE=${2:-540}; P=${3:-12}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/fuzz"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ATTNZOO_FUZZ=gpu
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'hypothesis', hypothesis.__version__)"
t0=$SECONDS
python3 -m pytest tests/fuzz --collect-only -q -p no:cacheprovider 2>/dev/null | grep '::' > "$OUT/fuzz/ids.txt"
echo "$(wc -l < "$OUT/fuzz/ids.txt") fuzz tests collected in $((SECONDS - t0)) s; $P processes"
for i in $(seq 0 $((P - 1))); do
  awk -v P="$P" -v i="$i" 'NR % P == i' "$OUT/fuzz/ids.txt" > "$OUT/fuzz/ids-$i.txt"
  [ -s "$OUT/fuzz/ids-$i.txt" ] || continue
  HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis-$i ATTNZOO_FUZZ_REPORT="$OUT/fuzz/report-$i.md" timeout -s INT $((DEADLINE - SECONDS)) \
    python3 -m pytest -q -p no:cacheprovider --hypothesis-seed="$SEED" --tb=short \
    $(cat "$OUT/fuzz/ids-$i.txt") > "$OUT/fuzz/log-$i.txt" 2>&1 &
done
wait
echo "fuzz processes done: $((SECONDS - t0)) s; $(ls "$OUT"/fuzz/report-*.md | wc -l) reports of $(ls "$OUT"/fuzz/ids-*.txt | wc -l) id lists"
grep -h -E "passed|failed|error" "$OUT"/fuzz/log-*.txt | tail -n "$P"
python3 bench/gpu/fuzz_merge.py "$OUT"/fuzz/report-*.md --seed "$SEED" --seconds $((SECONDS - t0)) \
  --command "bash bench/gpu/fuzz_parallel.sh $SEED $DEADLINE $P" > "$OUT/fuzz-gpu.md"
cat "$OUT/fuzz-gpu.md"
