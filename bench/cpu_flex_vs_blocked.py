"""Compiled flex against the blocked backend on the CPU, by plan row size: where
``ops.block_sparse``'s flex preference (``FLEX_*`` bounds in ``attnzoo/ops/block_sparse.py``) comes
from. Random plans as in ``bench/test_ops_bench.py`` (H 8 / Hkv 2, D 64, block 64), one per query
head (rows of 64 queries, XAttention's default) and one per KV head (rows of 256); medians, one
process, the first flex call (the compile) untimed.

    python bench/cpu_flex_vs_blocked.py [--lengths 4096 8192] [--densities 0.1 0.25 0.35] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from test_ops_bench import BLOCK, HKV, D, H, plan_with_density

from attnzoo import ops


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.35])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{torch.get_num_threads()} threads, H {H} / Hkv {HKV}, D {D}, block {BLOCK}; medians of {args.repeats}")
    print("| keys | plan rows | density | dense ms | flex ms | blocked ms | flex speed vs blocked |")
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        q, k, v = torch.randn(1, H, n, D), torch.randn(1, HKV, n, D), torch.randn(1, HKV, n, D)
        dense = median_time(lambda: ops.dense(q, k, v), args.repeats)
        for heads in (H, HKV):
            for d in args.densities:
                plan = plan_with_density(n, d, heads=heads)
                flex = median_time(lambda: ops.block_sparse(q, k, v, plan, backend="flex"), args.repeats)
                blocked = median_time(lambda: ops.block_sparse(q, k, v, plan, backend="blocked"), args.repeats)
                rows = H // heads * BLOCK
                print(f"| {n} | {rows} queries | {d} | {dense * 1e3:.0f} | {flex * 1e3:.0f} | {blocked * 1e3:.0f} "
                      f"| {blocked / flex:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
