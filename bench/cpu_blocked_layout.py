"""The portable ``blocked`` block-sparse backend against dense SDPA on the CPU, on three plans of a
3K-token layer shaped like the embedded model (9 query / 3 KV heads, D 64): the shipped streaming
and topk-blocks presets' plans, and a per-query-head plan whose heads range from dense to 5 %
(how XAttention leaves a layer). Medians of interleaved repeats, one process.

    python bench/cpu_blocked_layout.py [--n 3072] [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnzoo
from attnzoo import ops
from attnzoo.models import EMBEDDED_SHAPE
from attnzoo.plans import BlockPlan
from attnzoo.stack import CallContext


def plans(q, k, n: int) -> dict:
    nodes = {p: attnzoo.build(f"preset:{p}").for_model(EMBEDDED_SHAPE).node_for(5)
             for p in ("streaming", "topk-blocks")}
    out = {p: node.selector(q, k, CallContext(layer_idx=5)) for p, node in nodes.items()}
    g = torch.Generator().manual_seed(0)
    bm = BlockPlan.full(1, 9, n, n, 64, 64).to_block_mask()
    dens = torch.tensor([1.0, 0.6, 0.3, 0.15, 0.1, 0.1, 0.05, 0.05, 0.05])[None, :, None, None]
    bm &= torch.rand(bm.shape, generator=g) < dens
    bm |= torch.eye(bm.shape[-1], dtype=torch.bool)
    out["uneven heads (XAttention-like)"] = BlockPlan.from_block_mask(bm, 64, 64, n, n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, args.n, 64), torch.randn(1, 3, args.n, 64), torch.randn(1, 3, args.n, 64)
    cases = {"dense (SDPA)": lambda: ops.dense(q, k, v)}
    for name, plan in plans(q, k, args.n).items():
        cases[f"blocked: {name}, density {plan.density():.2f}"] = (
            lambda plan=plan: ops.block_sparse(q, k, v, plan, backend="blocked"))
    times: dict[str, list] = {name: [] for name in cases}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense (SDPA)"][1:])
    print(f"N={args.n}, 9/3 heads, D 64, {torch.get_num_threads()} threads; median of {args.repeats}")
    for name, ts in times.items():
        t = statistics.median(ts[1:])
        print(f"  {name:55s} {1e3 * t:8.1f} ms  {dense / t:5.2f}x dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
