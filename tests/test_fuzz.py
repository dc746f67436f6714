"""Hypothesis: random shapes, padding and valid plans; every op agrees with the reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnzoo import ops
from attnzoo.plans import BlockPlan

from .conftest import assert_lse_close, rel_err

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3, 4]))
    causal = draw(st.booleans())
    Nk = draw(st.integers(1, 150))
    Nq = draw(st.integers(1, Nk)) if causal else draw(st.integers(1, 150))
    D = draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    kpm = None
    if draw(st.booleans()):
        kpm = torch.rand(B, Nk, generator=g) < draw(st.floats(0.3, 1.0))
    bq = draw(st.sampled_from([1, 4, 16, 32, 64]))
    bk = draw(st.sampled_from([1, 4, 16, 32, 64]))
    H = draw(st.sampled_from([Hq, Hkv]))
    full = BlockPlan.full(B, H, Nq, Nk, bq, bk, causal=causal).to_block_mask()
    bm = (torch.rand(full.shape, generator=g) < draw(st.floats(0.0, 1.0))) & full
    plan = BlockPlan.from_block_mask(bm, bq, bk, Nq, Nk, causal)
    return q, k, v, kpm, plan


@SETTINGS
@given(problems(), st.booleans())
def test_block_sparse_matches_reference(problem, with_grad):
    q, k, v, kpm, plan = problem
    qs = [t.clone().requires_grad_(with_grad) for t in (q, k, v)]
    rs = [t.clone().requires_grad_(with_grad) for t in (q, k, v)]
    out, lse = ops.block_sparse(*qs, plan, key_padding_mask=kpm, return_lse=True)
    ref, ref_lse = ops.reference(*rs, plan, key_padding_mask=kpm, return_lse=True)
    assert rel_err(out, ref) <= 1e-4 or ref.abs().max() == 0
    assert_lse_close(lse, ref_lse, 1e-4)
    if with_grad:
        w = torch.randn_like(ref)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        for a, b in zip(qs, rs, strict=True):
            assert torch.isfinite(a.grad).all()
            assert rel_err(a.grad, b.grad) <= 1e-3 or b.grad.abs().max() == 0


@SETTINGS
@given(problems())
def test_dense_matches_reference(problem):
    q, k, v, kpm, plan = problem
    out, lse = ops.dense(q, k, v, causal=plan.causal, key_padding_mask=kpm, return_lse=True)
    ref, ref_lse = ops.reference(q, k, v, causal=plan.causal, key_padding_mask=kpm, return_lse=True)
    assert rel_err(out, ref) <= 1e-4 or ref.abs().max() == 0
    assert_lse_close(lse, ref_lse, 1e-4)
