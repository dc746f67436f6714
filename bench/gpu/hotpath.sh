#!/usr/bin/env bash
# The hot-path GPU run in two back-to-back calls (a call carries <= 64 MiB; the embedded GGUF is 98 MB):
#   tune:    bash bench/gpu/hotpath.sh tune   launch-configuration sweep (bench/gpu/tune.py), no model
#   part a:  bash bench/gpu/hotpath.sh a   (carry .whl/g1 then .whl/g2, with .whl/py)  GPU tests, keeps GGUF part 1 in /tmp
#   part b:  bash bench/gpu/hotpath.sh b   (carry .whl/g3 .whl/py)  joins the GGUF, runs bench/gpu/e2e.py
# .whl/g1|g2|g3 hold `split -b 33M -d SmolLM2-135M-Instruct.Q4_1.gguf gguf.part.` parts; .whl/py the gguf wheel.
set -uo pipefail
PART=${1:?usage: hotpath.sh a|b [e2e args...]}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$PART" = tune ]; then
  python3 bench/gpu/tune.py --out "$OUT/tune" "$@"
elif [ "$PART" = a ]; then
  cp .whl/g[0-9]/gguf.part.* /tmp/ && ls -la /tmp/gguf.part.*
  [ -n "${SKIP_TESTS:-}" ] || timeout "${GPU_TEST_S:-240}" python3 -m pytest -q -rA -p no:cacheprovider --durations=12 \
    ${TESTS_K:+-k "$TESTS_K"} tests/test_hot_path.py tests/test_kernels.py tests/test_head_router.py 2>&1 | grep -v "^PASSED" | tail -60 | tee "$OUT/pytest-gpu.txt"
else
  cp .whl/g[0-9]/gguf.part.* /tmp/ && cat /tmp/gguf.part.[0-9][0-9] > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf && md5sum /tmp/*.gguf
  python3 bench/gpu/e2e.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out "$OUT/e2e" "$@"
fi
