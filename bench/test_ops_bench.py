"""Op speed and memory: causal dense SDPA vs block_sparse on CPU across N and density.

    pytest bench/test_ops_bench.py --benchmark-columns=median,min,max

Each group (one N) has a ``dense`` row; the summary prints every row's speedup against it,
measured in the same process. ``extra_info`` records density, the backend dispatch chose and
peak memory of one call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import record

from attnzoo import ops
from attnzoo.eval.memory import peak_memory
from attnzoo.ops import dispatch
from attnzoo.plans import BlockPlan

H, HKV, D, BLOCK = 8, 2, 64, 64
NS = [4096, 8192, 16384]
DENSITIES = [0.5, 0.25, 0.1]


def plan_with_density(n: int, density: float, heads: int = HKV, seed: int = 0) -> BlockPlan:
    """Per-KV-head plan: sink and diagonal block plus random earlier blocks, each query block
    keeping about ``density`` of its causal-visible blocks (so the plan's density ~ target)."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // BLOCK)
    rows = torch.arange(nb)[:, None]
    cols = torch.arange(nb)[None, :]
    visible = cols <= rows
    scores = torch.rand(1, heads, nb, nb, generator=g).masked_fill(~visible, -1.0)
    scores[..., cols.squeeze(0), cols.squeeze(0)] = 2.0  # diagonal
    scores[..., 0] = torch.where(visible[:, 0], 2.0, -1.0)  # sink
    keep = torch.clamp((density * (rows.squeeze(1) + 1)).round().long(), min=1)
    order = scores.argsort(-1, descending=True).argsort(-1)
    bm = (order < keep[:, None]) & visible
    return BlockPlan.from_block_mask(bm, BLOCK, BLOCK, n, n)


@pytest.fixture(scope="module")
def qkv():
    cache = {}

    def get(n):
        if n not in cache:
            g = torch.Generator().manual_seed(n)
            cache.clear()
            cache[n] = tuple(torch.randn(1, h, n, D, generator=g) for h in (H, HKV, HKV))
        return cache[n]

    return get


def _run(benchmark, group, name, fn, rounds, **info):
    with torch.no_grad():
        fn()  # warm-up (and flex compilation)
        info["peak_bytes"] = peak_memory(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(info)
    record(group, name, benchmark, **info)


@pytest.mark.parametrize("n", NS)
def test_dense_causal(benchmark, qkv, n):
    q, k, v = qkv(n)
    benchmark.group = f"N={n}"
    req = dispatch.make_request("dense", q, k, v, "dense", return_lse=False, key_padding_mask=None,
                                causal=True)
    _run(benchmark, benchmark.group, "dense", lambda: ops.dense(q, k, v), rounds=3 if n > 8192 else 5,
         density=1.0, backend=dispatch.choose(req).name, n=n)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", ["auto", "blocked"])
def test_block_sparse(benchmark, qkv, n, density, backend):
    q, k, v = qkv(n)
    plan = plan_with_density(n, density)
    benchmark.group = f"N={n}"
    req = dispatch.make_request("block_sparse", q, k, v, "block", return_lse=False,
                                key_padding_mask=None, causal=True, plan_heads=plan.heads,
                                plan_density=plan.density())  # exactly what ops.block_sparse asks
    chosen = dispatch.choose(req, None if backend == "auto" else backend).name
    fn = lambda: ops.block_sparse(q, k, v, plan, backend=None if backend == "auto" else backend)
    _run(benchmark, benchmark.group, f"block_sparse d={density} [{backend}]", fn,
         rounds=3 if n > 8192 else 5, density=plan.density(), backend=chosen, n=n)
