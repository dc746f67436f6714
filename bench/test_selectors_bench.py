"""Selector overhead: time to build a plan as a share of causal dense attention at the same N.

    pytest bench/test_selectors_bench.py --benchmark-columns=median

Every registered selector (at its default config) is timed; ``extra_info`` has the plan's
density and attention recall. Inputs are Gaussian q/k with a few heavy "sink" keys and a local
bias, so attention is neither uniform nor trivial; real-model figures come from
``bench/selector_quality.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import record

import attnzoo
from attnzoo import ops
from attnzoo.eval import attention_recall

H, HKV, D = 8, 2, 64
NS = [4096, 16384]


def structured_qk(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, n, D, generator=g)
    k = torch.randn(1, HKV, n, D, generator=g)
    k[:, :, :4] += 3 * q.mean((1, 2), keepdim=True)[:, :1]  # sink keys most queries like
    pos = torch.arange(n, dtype=torch.float32)
    rot = torch.stack([torch.sin(pos / 64), torch.cos(pos / 64)], -1)  # slow rotation: locality
    q[..., :2] += 4 * rot
    k[..., :2] += 4 * rot
    v = torch.randn(1, HKV, n, D, generator=g)
    return q, k, v


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(n):
        if n not in cache:
            cache.clear()
            cache[n] = structured_qk(n)
        return cache[n]

    return get


@pytest.mark.parametrize("n", NS)
def test_dense_reference_time(benchmark, inputs, n):
    q, k, v = inputs(n)
    benchmark.group = f"selectors N={n}"
    with torch.no_grad():
        benchmark.pedantic(lambda: ops.dense(q, k, v), rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark.group, "dense", benchmark, density=1.0, recall=1.0)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_selector_overhead(benchmark, inputs, n, name):
    q, k, _ = inputs(n)
    sel = attnzoo.create("selector", name)
    benchmark.group = f"selectors N={n}"
    with torch.no_grad():
        plan = benchmark.pedantic(lambda: sel(q, k), rounds=3, iterations=1, warmup_rounds=1)
        info = {"density": plan.density(), "recall": attention_recall(q, k, plan)}
    benchmark.extra_info.update(info)
    record(benchmark.group, f"select {name}", benchmark, **info)
