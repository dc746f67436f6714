"""Kernels for an Nsight Compute look at the misses of the GPU run (one launch each):

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \\
        -k regex:"_fwd_kernel|_scores_kernel" --launch-skip 2 --launch-count 2 python3 bench/gpu/ncu_profile.py

Triton block-sparse forward at 64K, density 0.05 (B=1, Hq=32, Hkv=8, D=128, bf16) and the
XAttention scoring kernel at 32K (stride 8, block 128).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnzoo import ops  # noqa: E402
from attnzoo.ops.antidiagonal import antidiagonal_block_scores  # noqa: E402
from bench.gpu.run import qkv, random_plan  # noqa: E402

q, k, v = qkv(65536, 1)
plan = random_plan(1, 32, 65536, 65536, 128, 0.05, seed=3)
for _ in range(3):
    ops.block_sparse(q, k, v, plan, backend="triton")
q, k, v = qkv(32768, 2)
for _ in range(3):
    list(antidiagonal_block_scores(q, k, stride=8, block_size=128, chunk_size=32768, backend="triton"))
torch.cuda.synchronize()
