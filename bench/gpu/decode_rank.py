"""Where a Quest decode step's time goes (issue 39): Quest's page scores, the top-n ranking (at several
warp counts, against torch.topk) and the sparse op on the step's plan, timed apart, each captured in a
CUDA graph.

    python3 bench/gpu/decode_rank.py --out DIR [--length 131072] [--budget 4096] [--page-sizes 16 32 64]
        [--heads 32 8 --head-dim 128] [--warps 4 8 16 32]

The ranking (``ops.kernels.triton_select``, rule ``top_n``) runs one program per (sequence, query head)
and searches the cut over the score bits: a binary search (31 dependent counts over the row) or, the
decode default, 8 histograms of 4-bit digits ("-radix"); both at each warp count. More warps per
program spread each count over more threads but make each reduction cost more; this measures which
wins at 2K-8K pages. Every variant's picked pages are checked against the default launch's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnzoo  # noqa: E402
from attnzoo import ops  # noqa: E402
from attnzoo.ops import pages  # noqa: E402
from attnzoo.ops.kernels import triton_select  # noqa: E402
from attnzoo.selectors.quest import _rule_tensors  # noqa: E402
from attnzoo.stack import CallContext  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import graphed_ms  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dev, n, (hq, hkv), d = "cuda", args.length, args.heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    rows = []
    for ps in args.page_sizes:
        sel = attnzoo.create("selector", {"name": "quest", "page_size": ps, "budget": args.budget})
        cache = {}
        sel(q, k, CallContext(cache=cache))  # the prefill's bounds
        lo, hi = sel.decode_bounds(k, None, cache)
        n_pages, pick = -(-n // ps), args.budget // ps
        last = n_pages - 1
        forced_lo = max(0, last - -(-sel.local // ps))
        score = lambda: pages.page_scores(q, lo, hi, n_pages=n_pages, forced_lo=forced_lo, page_size=ps, k=k)  # noqa: E731
        s = score()
        n_pick, own_lo, last_t = _rule_tensors(pick - 1, last, last, q.device)
        flat = s.float()
        def picked(idx, cnt):  # the slots past a row's count are not written (uninitialised on a GPU)
            return torch.where(torch.arange(idx.shape[-1], device=dev) < cnt[..., None], idx, -1)

        want = picked(*triton_select._launch("top_n", flat, pick + 2, last=last_t, n_pick=n_pick, own_lo=own_lo,
                                             radix=False))
        plan = sel(q, k, CallContext(cache=cache, decode=True))
        v = torch.randn_like(k)
        row = {"page_size": ps, "pages": n_pages, "pick": pick, "scores_graph_ms": graphed_ms(score, dev, args.reps)[0],
               # the sparse op alone on the step's plan (split-K over the picked pages, then the merge)
               "op_graph_ms": graphed_ms(lambda plan=plan: ops.block_sparse(q, k, v, plan), dev, args.reps)[0],
               "topk_graph_ms": graphed_ms(lambda: torch.topk(flat, pick, dim=-1), dev, args.reps)[0], "top_n": {}}
        for w, radix in [(w_, r_) for w_ in args.warps for r_ in (False, True)]:
            def rank(w=w, radix=radix):
                return triton_select._launch("top_n", flat, pick + 2, last=last_t, n_pick=n_pick, own_lo=own_lo,
                                             num_warps=w, radix=radix)
            same = bool(torch.equal(picked(*rank()), want))
            ms, why = graphed_ms(rank, dev, args.reps)
            row["top_n"][f"{w}{'-radix' if radix else ''}"] = {"graph_ms": ms, "note": why, "same_pages": same}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "rank.json").write_text(json.dumps({"command": "python3 " + " ".join(sys.argv),
                                                     "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
