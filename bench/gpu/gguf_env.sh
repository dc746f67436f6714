# Sourced by the GPU scripts that run the embedded model (compare.sh, fidelity_run.sh, graphs.sh):
# $OUT, the carried gguf wheel on the path, the cache in /tmp, $GGUF where the joined model lands,
# the GPU's name; `keep_part` keeps a carried GGUF part in /tmp (a warm machine keeps /tmp between
# calls), `join_gguf` adds the carried last part and joins them. The GGUF is 98 MB and a call carries
# 64 MiB with the tree (~18 MB), so it travels in three parts, one per call: `.whl/g1`, `.whl/g2`,
# `.whl/g3` (made by `split -b 33M -d <gguf> gguf.part.`).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/py/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 ATTNZOO_CACHE=/tmp/attnzoo-cache
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

keep_part() { cp .whl/g[0-9]/gguf.part.* /tmp/ && ls -la /tmp/gguf.part.*; }
join_gguf() { keep_part && cat /tmp/gguf.part.[0-9][0-9] > "$GGUF" && md5sum "$GGUF"; }
