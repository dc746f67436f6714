"""The Triton top-n selection's two cut searches, timed on top-k blocks' prefill rows.

    python3 bench/gpu/select_radix.py [--lengths 16384 32768 131072] [--heads 3] [--decide]

Scores are shaped as ``topk-blocks`` hands them to ``block_select`` (16-token blocks, one row per
query block and KV head: -1 past the causal frontier, ``ops.pooled.FIRST`` at the 64-token sink and
the 256 tokens before each query block, pooled softmax sums elsewhere), with the shipped preset's
picks. Both searches must give the same lists; each is timed with CUDA events (median of 20). With
``--decide`` the last line is ``1`` where the radix search was faster at the longest length, else ``0``
(for ``ATTNZOO_SELECT_RADIX``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnzoo.ops.kernels import triton_select  # noqa: E402
from attnzoo.ops.pooled import FIRST  # noqa: E402
from attnzoo.selectors.topk_blocks import _sets  # noqa: E402


def scores(n: int, heads: int, sets, device) -> torch.Tensor:
    nb = n // 16
    g = torch.Generator(device=device).manual_seed(n)
    s = torch.rand(1, heads, nb, nb, generator=g, device=device) ** 8  # a few large sums per row
    past = torch.arange(nb, device=device)[None, :] < sets.own_lo[:, None]
    s = s.masked_fill(~past, -1.0)
    return torch.where(sets.forced & past, FIRST, s)


def cuda_ms(fn, reps: int = 20) -> float:
    if not torch.cuda.is_available():  # a smoke run under the Triton interpreter: wall time, one run
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    spec = importlib.util.spec_from_file_location("attnzoo_bench_run", Path(__file__).with_name("run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cuda_time(fn, reps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 131072])
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--decide", action="store_true")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    faster = False
    print("| keys | query blocks | binary ms | radix ms | same lists |\n|---|---|---|---|---|")
    for n in args.lengths:
        sets = _sets(n, n, 16, 16, 4, 16, torch.device(dev))
        s = scores(n, args.heads, sets, dev)
        kw = dict(last=sets.last, n_pick=sets.n_pick, own_lo=sets.own_lo)
        out = {r: triton_select._launch("top_n", s, 16 + 4 + 16 + 2, radix=r, **kw) for r in (False, True)}
        same = all(torch.equal(a, b) for a, b in zip(out[False], out[True], strict=True))
        ms = {r: cuda_ms(lambda r=r: triton_select._launch("top_n", s, 38, radix=r, **kw)) for r in (False, True)}
        print(f"| {n} | {n // 16} | {ms[False]:.3f} | {ms[True]:.3f} | {same} |")
        faster = same and ms[True] < ms[False]
    if args.decide:
        print(int(faster))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
