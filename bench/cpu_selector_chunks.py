"""The XAttention selector on a CPU against the torch scorer's query chunk (settings ``cpu_score_chunk_tokens``, read in
``attnzoo/ops/antidiagonal.py``): each chunk skips the key columns right of its own diagonal, so
smaller chunks compute closer to the causal half, at more per-chunk overhead.

    python bench/cpu_selector_chunks.py [--lengths 2048 3072 8192] [--chunks 512 1024 2048] [--reps 9]

Per length: the selector's ms (median of ``--reps``, the chunk sizes interleaved per round, one
process) at SmolLM2's attention shape (9/3 heads, D 64, fp32, stride 8, block 64, dense_tail 64),
with dense causal SDPA (the fastest dense attention on this CPU) beside it, and a check that every
chunk size gives the same plan.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import settings


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 3072, 8192])
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048],
                    help="query tokens per chunk; 2048 is the selector's chunk_size (no CPU cap)")
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args(argv)
    sel = attnzoo.create("selector", {"name": "xattention", "threshold": 0.9, "stride": 8, "block_size": 64,
                                      "dense_tail": 64, "chunk_size": max(args.chunks)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} interleaved rounds")
    print("| tokens | dense SDPA ms | " + " | ".join(f"chunks of {c}: ms" for c in args.chunks) + " |")
    print("|---|---|" + "---|" * len(args.chunks))
    for n in args.lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, n, 64, generator=g) * 2 for h in (9, 3, 3))
        times = {c: [] for c in args.chunks}
        masks = {}
        for c in args.chunks:  # untimed first call: per-shape caches; the plans compared
            with settings.override(cpu_score_chunk_tokens=c):
                masks[c] = sel(q, k).to_block_mask()
        same = all(torch.equal(m, masks[args.chunks[0]]) for m in masks.values())
        for r in range(args.reps):
            order = args.chunks[r % len(args.chunks):] + args.chunks[: r % len(args.chunks)]
            for c in order:
                with settings.override(cpu_score_chunk_tokens=c):
                    times[c].append(_ms(lambda: sel(q, k)))
        dense = statistics.median(
            _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            for _ in range(3))
        cells = " | ".join(f"{statistics.median(times[c]):.1f}" for c in args.chunks)
        print(f"| {n} | {dense:.1f} | {cells} |" + ("" if same else " plans differ!"))


if __name__ == "__main__":
    main()
