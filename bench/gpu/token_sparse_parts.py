"""Where one Token Sparse layer call spends its device time on a GPU, against dense attention.

    python3 bench/gpu/token_sparse_parts.py [--lengths 8192 16384 65536] [--kept 0.85] [--reps 20]

Per length, the embedded model's attention shape (9 / 3 heads, D 64, bf16), CUDA events around each
stage (``triton.testing.do_bench``'s median): the shipped ``token_coverage`` selector (on random inputs:
its cost does not depend on the values), the gather of the kept rows at the static width (N) and the
scatter back, the inner attention by ``triton_rows`` with every head keeping ``--kept`` of the tokens,
the same at the bucketed width by PyTorch's default SDPA (the read-width path), and dense attention
by PyTorch's default SDPA over all N (the baseline, with its TFLOP/s). Prints one table row per length.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnzoo  # noqa: E402
from attnzoo.context import CallContext  # noqa: E402
from attnzoo.ops import dense, token_sparse  # noqa: E402
from attnzoo.plans import TokenPlan  # noqa: E402
from attnzoo.plans.token import bucket_width  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median device milliseconds of ``fn()`` (``triton.testing.do_bench``: CUDA events, the L2 cache
    flushed between runs, ``reps`` ms of warm-up and ``5 * reps`` ms of runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=reps, rep=5 * reps, return_mode="median")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 65536])
    p.add_argument("--kept", type=float, default=0.85)
    p.add_argument("--reps", type=int, default=20, help="ms of warm-up (5x as many ms of timed runs)")
    args = p.parse_args(argv)
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": 0.005, "window": 128, "min_tokens": 1024})
    print("| N | dense SDPA ms (TFLOP/s) | selector | gather (N wide) | triton_rows at kept | scatter | "
          "static total | SDPA at bucketed width | read-width total (no sync) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, h, n, 64, device="cuda", generator=g, dtype=torch.bfloat16) for h in (9, 3, 3))
        with torch.no_grad():
            t_dense = timed(lambda: dense(q, k, v), args.reps)
            t_sel = timed(lambda: sel(q, k, CallContext(static_shapes=True)), args.reps)
            kept = int(args.kept * n)
            keep = torch.zeros(1, 9, n, dtype=torch.bool, device="cuda")
            keep[..., n - kept:] = True
            plan = TokenPlan.from_keep_mask(keep, n)
            t_gather = timed(lambda: token_sparse.compress(q, k, v, plan), args.reps)
            qc, kc, vc = token_sparse.compress(q, k, v, plan)
            t_rows = timed(lambda: dense(qc, kc, vc, row_lengths=plan.lengths), args.reps)
            oc = dense(qc, kc, vc, row_lengths=plan.lengths)
            t_scatter = timed(lambda: token_sparse.decompress(oc, plan, n), args.reps)
            w = bucket_width(kept, n)
            qb, kb, vb = (t[:, :, :w].contiguous() for t in (qc, kc, vc))
            t_bucket = timed(lambda: dense(qb, kb, vb), args.reps)
        tflops = 4 * 9 * 64 * n * n / 2 / (t_dense * 1e-3) / 1e12
        static = t_sel + t_gather + t_rows + t_scatter
        read = t_sel + t_gather * w / n + t_bucket + t_scatter
        print(f"| {n} | {t_dense:.3f} ({tflops:.0f}) | {t_sel:.3f} | {t_gather:.3f} | {t_rows:.3f} | {t_scatter:.3f} | "
              f"**{static:.3f}** ({t_dense / static:.2f}x) | {t_bucket:.3f} | {read:.3f} ({t_dense / read:.2f}x) |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
