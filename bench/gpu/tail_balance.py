"""The block-sparse forward's program order on the GPU, on XAttention-like plans with and without
a dense tail (``dense_tail``: a sequence's last query blocks keep every block), at the embedded
SmolLM2's attention shape (9/3 heads, D 64, bf16, batch 1).

    python3 bench/gpu/tail_balance.py [--out DIR]

A dense row is the longest walk of the plan; started last (the old order: every tile of head 0
before head 1's) it runs alone at the end. Per length: forward ms (CUDA events, median of 20) for
settings ``attention_heads_first`` on (shipped) and False, outputs compared bit for bit, and dense attention
(PyTorch's default SDPA, the fastest dense here) with its TFLOP/s; the sparse TFLOP/s count the
plan's pairs (4 * pairs * D). Writes ``tail_balance.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune import cuda_ms, random_plan  # noqa: E402

from attnzoo import ops, settings  # noqa: E402
from attnzoo.plans import BlockPlan  # noqa: E402

HQ, HKV, D, BLOCK = 9, 3, 64, 64


def with_tail(plan: BlockPlan, tail_blocks: int) -> BlockPlan:
    mask = plan.to_block_mask().clone()
    nqb, nkb = mask.shape[2:]
    causal = torch.ones(nqb, nkb, dtype=torch.bool, device=mask.device).tril(nkb - nqb)
    mask[:, :, -tail_blocks:] = causal[-tail_blocks:]
    return BlockPlan.from_block_mask(mask, plan.block_q, plan.block_k, plan.q_len, plan.kv_len)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--density", type=float, default=0.15)
    args = ap.parse_args()
    dev, rows = "cuda", []
    for n in args.lengths:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, h, n, D, device=dev, dtype=torch.bfloat16, generator=g) for h in (HQ, HKV, HKV))
        dense_ms = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 20)
        dense_flops = 4 * D * HQ * n * (n + 1) / 2
        row = {"tokens": n, "dense_ms": round(dense_ms, 4), "dense_tflops": round(dense_flops / dense_ms / 1e9, 1)}
        base = random_plan(n, HQ, BLOCK, args.density, dev)
        for label, plan in (("plan", base), ("plan+tail2", with_tail(base, 2))):
            pairs = float(plan.density()) * HQ * n * (n + 1) / 2
            outs = {}
            for heads_first in (True, False):
                fn = lambda plan=plan: ops.block_sparse(q, k, v, plan, backend="triton")  # noqa: E731
                with settings.override(attention_heads_first=heads_first):
                    outs[heads_first] = fn()
                    ms = cuda_ms(fn, 20)
                row[f"{label} heads_first={heads_first}"] = {
                    "ms": round(ms, 4), "vs_dense": round(dense_ms / ms, 2), "density": round(float(plan.density()), 4),
                    "tflops": round(4 * D * pairs / ms / 1e9, 1)}
            row[f"{label} same"] = bool(torch.equal(outs[True], outs[False]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tail_balance.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
