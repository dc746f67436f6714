"""Token compress / decompress against the reference with the same TokenPlan."""

from __future__ import annotations

import pytest
import torch

from attnzoo import ops
from attnzoo.ops import token_sparse
from attnzoo.plans import TokenPlan

from .conftest import assert_lse_close, make_qkv, padding_mask, random_token_plan, rel_err


@pytest.mark.parametrize("B,Hq,Hkv,N", [(1, 4, 4, 300), (3, 6, 2, 257), (2, 8, 2, 1000)])
@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("pad", ["none", "left"])
@pytest.mark.parametrize("extra", [None, 37])
def test_token_sparse_matches_reference(B, Hq, Hkv, N, per_kv_head, pad, extra):
    """``extra``: a static plan width 37 slots past the longest head (a capped selector's): the
    tail slots are attended by no real row."""
    q, k, v = make_qkv(B, Hq, Hkv, N, N, 32, requires_grad=True)
    kpm = padding_mask(B, N, pad)
    plan = random_token_plan(B, Hkv if per_kv_head else Hq, N, keep=0.4, key_padding_mask=kpm, width=extra)
    if extra:
        assert plan.max_len == int(plan.lengths.max()) + extra
    out, lse = token_sparse.attention(q, k, v, plan, key_padding_mask=kpm, return_lse=True)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = ops.reference(qr, kr, vr, plan, key_padding_mask=kpm, return_lse=True)
    assert rel_err(out, ref) <= 1e-4
    assert_lse_close(lse, ref_lse, 1e-4)
    dropped = ~plan.keep_mask().repeat_interleave(Hq // plan.heads, 1)
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped])), "dropped tokens get exactly 0"
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in ((q, qr), (k, kr), (v, vr)):
        assert rel_err(a.grad, b.grad) <= 1e-3


def test_compress_shapes_and_no_kv_repeat_for_kv_head_plans():
    q, k, v = make_qkv(2, 6, 2, 50, 50, 8)
    plan = random_token_plan(2, 2, 50, keep=0.3)
    qc, kc, vc = token_sparse.compress(q, k, v, plan)
    assert qc.shape == (2, 6, plan.max_len, 8)
    assert kc.shape == vc.shape == (2, 2, plan.max_len, 8)  # K/V stay at Hkv heads
    per_q = random_token_plan(2, 6, 50, keep=0.3)
    assert token_sparse.compress(q, k, v, per_q)[1].shape == (2, 6, per_q.max_len, 8)
    # the gathered rows are the kept rows
    b, h = 1, 1
    n = int(plan.lengths[b, h])
    torch.testing.assert_close(kc[b, h, :n], k[b, h, plan.indices[b, h, :n]])


def test_decompress_roundtrip_and_errors():
    plan = random_token_plan(2, 3, 20, keep=0.5)
    x = torch.randn(2, 3, plan.max_len, 4)
    full = token_sparse.decompress(x, plan)
    keep = plan.keep_mask()
    assert torch.equal(full[~keep], torch.zeros_like(full[~keep]))
    for b in range(2):
        for h in range(3):
            n = int(plan.lengths[b, h])
            assert torch.equal(full[b, h, plan.indices[b, h, :n]], x[b, h, :n])
    with pytest.raises(ValueError, match="seq_len"):
        token_sparse.decompress(x, plan, 21)
    with pytest.raises(ValueError, match="does not match plan"):
        token_sparse.decompress(x[:, :, :-1], plan)


def test_plan_keeping_padding_is_rejected():
    q, k, v = make_qkv(2, 2, 2, 30, 30, 8)
    kpm = padding_mask(2, 30, "left")
    plan = TokenPlan.from_keep_mask(torch.ones(2, 2, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match="keeps padding positions"):
        token_sparse.compress(q, k, v, plan, key_padding_mask=kpm)
    with pytest.raises(TypeError, match="TokenPlan"):
        token_sparse.compress(q, k, v, "not a plan")


def test_bucket_width_bounds_the_extra_slots_and_the_shapes():
    from attnzoo.plans.token import bucket_width

    widths = set()
    for n in range(1, 20000):
        w = bucket_width(n, 20000)
        assert n <= w <= 20000 and (n < 512 or w <= n * 1.125), (n, w)
        widths.add(w)
    assert bucket_width(9000, 9100) == 9100  # never past the sequence
    assert len({bucket_width(n, 10**6) for n in range(8193, 16385)}) == 8  # eight shapes per doubling


def test_token_coverage_widths_are_bucketed_and_change_nothing():
    """The selector's plan is wider than its longest head only by tail slots: the attention output
    equals the exact-width plan's (the shape is bucketed so kernels with per-shape setup -- cuDNN
    SDPA -- see a few shapes, not one per call)."""
    from attnzoo.plans.token import bucket_width
    from attnzoo.selectors.token_coverage import TokenCoverage

    sel = TokenCoverage(coverage=0.05, window=32, min_tokens=64)
    g = torch.Generator().manual_seed(3)
    for N in (700, 1111):
        q, k, v = (torch.randn(2, 4, N, 16, generator=g) * 2 for _ in range(3))
        k, v = k[:, :2], v[:, :2]
        plan = sel(q, k)
        exact = TokenPlan.from_keep_mask(plan.keep_mask())
        assert plan.max_len == bucket_width(exact.max_len, N) > exact.max_len  # 640 > 601, 960 > 914
        assert torch.equal(plan.lengths, exact.lengths)
        a = token_sparse.attention(q, k, v, plan, return_lse=True)
        b = token_sparse.attention(q, k, v, exact, return_lse=True)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
