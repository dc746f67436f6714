#!/usr/bin/env bash
# Issue 37's GPU fuzz campaign in one call: one pytest process per fuzz test, P at a time sharing
# the GPU, then their reports summed (bench/gpu/fuzz_merge.py).
#   bash bench/gpu/fuzz_parallel.sh [seed] [deadline_s] [processes]
# Why processes: one process checked ~1 case/s (cuDNN builds a graph per new SDPA shape, Triton
# compiles per new specialisation) -- host-bound work, so 12 processes on the 16 cores go ~10x
# faster, while the GPU stays mostly idle. Every process has the same hypothesis seed and is stopped
# with SIGINT at the deadline, so pytest finishes its session and writes the report of what it checked.
set -uo pipefail
SEED=${1:-20261208}; DEADLINE=${2:-540}; P=${3:-12}
OUT=${OUT:-/tmp/out}; W=/tmp/fuzz; rm -rf "$W"; mkdir -p "$OUT" "$W"  # $OUT returns 8 files at most
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ATTNZOO_FUZZ=${ATTNZOO_FUZZ:-gpu}  # ci: try the script on a CPU
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'hypothesis', hypothesis.__version__)"
t0=$SECONDS
python3 -m pytest tests/fuzz --collect-only -q -p no:cacheprovider 2>/dev/null | grep '::' > "$W/ids.txt"
echo "$(wc -l < "$W/ids.txt") fuzz tests collected in $((SECONDS - t0)) s; $P processes"
END=$(( $(date +%s) + DEADLINE - SECONDS ))
export SEED END W
# one pytest process per fuzz test, P at a time: a Triton-bound test (compiles) keeps one process
# busy to the deadline while the rest share the others
cat -n "$W/ids.txt" | xargs -P "$P" -L 1 bash -c 'left=$((END - $(date +%s))); [ "$left" -gt 20 ] || exit 0
  HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis-$0 ATTNZOO_FUZZ_REPORT="$W/report-$0.md" timeout -s INT "$left" \
    python3 -m pytest -q -p no:cacheprovider --hypothesis-seed="$SEED" --tb=short "$1" > "$W/log-$0.txt" 2>&1; true'
echo "fuzz processes done: $((SECONDS - t0)) s; $(ls "$W"/report-*.md | wc -l) reports of $(wc -l < "$W/ids.txt") tests"
grep -h -E "passed|failed|error" "$W"/log-*.txt | tail -n "$P"
python3 bench/gpu/fuzz_merge.py "$W"/report-*.md --seed "$SEED" --seconds $((SECONDS - t0)) \
  --command "bash bench/gpu/fuzz_parallel.sh $SEED $DEADLINE $P" > "$OUT/fuzz-gpu.md"
cat "$OUT/fuzz-gpu.md"
cat "$W"/report-*.md > "$OUT/fuzz-reports.md"
# the logs of processes with a failure (hypothesis's shrunk reproducer), whole; the others' last lines
for f in "$W"/log-*.txt; do
  if grep -q -E "FAILED|Falsifying|Error" "$f"; then echo "== $f"; tail -c 300000 "$f"; else echo "== $f (tail)"; tail -3 "$f"; fi
done > "$OUT/fuzz-logs.txt"
grep -h -A40 "Falsifying\|^E " "$W"/log-*.txt | head -150
