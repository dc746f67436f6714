"""Plans: constructors, to_mask, density, validation errors, repr."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.plans import BlockPlan, DensePlan, HeadPlan, TokenPlan, causal_mask, visible_pairs

from .conftest import make_qkv, random_block_plan, random_token_plan


@settings(max_examples=200, deadline=None)
@given(i0=st.integers(0, 40), di=st.integers(0, 40), j0=st.integers(0, 40), dj=st.integers(0, 40),
       off=st.integers(-10, 40), causal=st.booleans())
def test_visible_pairs_closed_form_matches_brute_force(i0, di, j0, dj, off, causal):
    brute = sum(1 for i in range(i0, i0 + di) for j in range(j0, j0 + dj) if not causal or j <= i + off)
    assert int(visible_pairs(i0, i0 + di, j0, j0 + dj, off, causal)) == brute


@pytest.mark.parametrize("nq,nk,bq,bk", [(100, 100, 16, 16), (37, 101, 8, 32), (1, 77, 16, 16),
                                         (130, 200, 64, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_block_plan_mask_and_density_agree(nq, nk, bq, bk, causal):
    if causal and nk < nq:
        pytest.skip("causal needs nk >= nq")
    plan = random_block_plan(2, 3, nq, nk, bq, bk, p=0.5, causal=causal)
    mask = plan.to_mask()
    assert mask.shape == (2, 3, nq, nk)
    visible = causal_mask(nq, nk) if causal else torch.ones(nq, nk, dtype=torch.bool)
    assert not (mask & ~visible).any(), "mask must respect the causal rule"
    expected = mask.sum((-1, -2)).double() / visible.sum()
    torch.testing.assert_close(plan.density(reduce=False), expected)
    # round trip through the block mask
    again = BlockPlan.from_block_mask(plan.to_block_mask(), bq, bk, nq, nk, causal)
    assert torch.equal(again.to_mask(), mask)


def test_full_plan_is_every_causal_pair():
    plan = BlockPlan.full(1, 2, 50, 130, 16, 32)
    assert torch.equal(plan.to_mask()[0, 0], causal_mask(50, 130))
    assert plan.density() == pytest.approx(1.0)


def test_from_block_mask_sorts_and_pads():
    bm = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    bm[0, 0, 3, [0, 2, 3]] = True
    bm[0, 0, 1, 1] = True
    plan = BlockPlan.from_block_mask(bm, 4, 4, 16, 16)
    assert plan.kv_counts.tolist() == [[[0, 1, 0, 3]]]
    assert plan.kv_indices[0, 0, 3].tolist() == [0, 2, 3]
    assert plan.kv_indices[0, 0, 1].tolist() == [1, -1, -1]


def test_block_plan_repr_and_show_are_readable():
    plan = BlockPlan.full(2, 4, 256, 256, 64, 64)
    r = repr(plan)
    for part in ("batch=2", "heads=4", "block=64x64", "blocks=4x4", "density=1.000", "causal=True"):
        assert part in r
    assert plan.show().splitlines() == ["#   ", "##  ", "### ", "####"]


@pytest.mark.parametrize("mutate,match", [
    (lambda i, c: (i.fill_(9), c), "out of range"),
    # the last query block selects all 4 key blocks; reverse that row
    (lambda i, c: (torch.cat([i[..., :3, :], i[..., 3:, :].flip(-1)], dim=2), c), "strictly ascending"),
    (lambda i, c: (i, c.fill_(99)), "kv_counts must lie"),
    (lambda i, c: (i, c.fill_(-1)), "kv_counts must lie"),
])
def test_block_plan_content_errors(mutate, match):
    q, k, _ = make_qkv(1, 2, 2, 64, 64, 8)
    plan = BlockPlan.full(1, 2, 64, 64, 16, 16)
    idx, cnt = mutate(plan.kv_indices.clone(), plan.kv_counts.clone())
    with pytest.raises(ValueError, match=match):
        BlockPlan(idx, cnt, 16, 16, 64, 64).validate(q, k)


def test_block_plan_beyond_causal_diagonal_is_rejected():
    q, k, _ = make_qkv(1, 1, 1, 64, 64, 8)
    bm = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    bm[0, 0, 1, 2] = True  # query block 1 cannot see key block 2
    plan = BlockPlan.from_block_mask(bm, 16, 16, 64, 64)
    with pytest.raises(ValueError, match="right of the causal diagonal"):
        plan.validate(q, k)
    BlockPlan.from_block_mask(bm, 16, 16, 64, 64, causal=False).validate(q, k)  # fine non-causal


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(block_q=0), ValueError, "block_q"),
    (dict(block_k=1.5), TypeError, "block_k"),
    (dict(q_len=100), ValueError, "kv_len >= q_len"),
    (dict(kv_indices=torch.zeros(1, 1, 4, 2)), TypeError, "kv_indices must be int32"),
    (dict(kv_counts=torch.zeros(1, 1, 3, dtype=torch.int32)), ValueError, "kv_counts shape"),
    (dict(kv_indices=torch.zeros(1, 1, 5, 2, dtype=torch.int32),
          kv_counts=torch.zeros(1, 1, 5, dtype=torch.int32)), ValueError, "query blocks"),
])
def test_block_plan_structure_errors(kwargs, exc, match):
    base = dict(kv_indices=torch.zeros(1, 1, 4, 2, dtype=torch.int32),
                kv_counts=torch.zeros(1, 1, 4, dtype=torch.int32), block_q=16, block_k=16,
                q_len=64, kv_len=64)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        BlockPlan(**base)


def test_block_plan_validate_against_tensors():
    plan = BlockPlan.full(2, 3, 64, 64, 16, 16)
    with pytest.raises(ValueError, match="batch"):
        plan.validate(*make_qkv(1, 3, 3, 64, 64, 8)[:2])
    with pytest.raises(ValueError, match="heads"):
        plan.validate(*make_qkv(2, 4, 4, 64, 64, 8)[:2])
    with pytest.raises(ValueError, match="q_len=64"):
        plan.validate(*make_qkv(2, 3, 3, 65, 65, 8)[:2])
    plan.validate(*make_qkv(2, 6, 3, 64, 64, 8)[:2])  # per-KV-head plan for GQA is fine


def test_token_plan_mask_density_and_errors():
    plan = random_token_plan(2, 3, 40, keep=0.5)
    keep = plan.keep_mask()
    mask = plan.to_mask()
    n = keep.sum(-1)
    assert torch.equal(mask.sum((-1, -2)), n * (n + 1) // 2)
    torch.testing.assert_close(plan.density(reduce=False), (n * (n + 1)).double() / (40 * 41))
    assert "TokenPlan(batch=2, heads=3, seq_len=40" in repr(plan)
    q, k, _ = make_qkv(2, 3, 3, 40, 40, 8)
    plan.validate(q, k)
    bad = TokenPlan(torch.tensor([[[5, 3, 8]]]), torch.tensor([[3]]), 40)
    with pytest.raises(ValueError, match="ascending"):
        bad.validate(*make_qkv(1, 1, 1, 40, 40, 8)[:2])
    with pytest.raises(ValueError, match="self-attention"):
        plan.validate(*make_qkv(2, 3, 3, 20, 40, 8)[:2])
    with pytest.raises(ValueError, match="out of range"):
        TokenPlan(plan.indices + 100, plan.lengths, 40).validate(q, k)
    # a static width: the same kept positions, more tail slots; a width below a head's count is refused
    wide = TokenPlan.from_keep_mask(keep, 40)
    assert wide.max_len == 40 and torch.equal(wide.keep_mask(), keep) and torch.equal(wide.lengths, plan.lengths)
    with pytest.raises(ValueError, match="more than width"):
        TokenPlan.from_keep_mask(keep, int(n.max()) - 1)
    for bad_width, exc in ((0, ValueError), (41, ValueError), (2.5, TypeError)):
        with pytest.raises(exc, match="width"):
            TokenPlan.from_keep_mask(keep, bad_width)


def test_head_plan():
    hp = HeadPlan(torch.tensor([[0, 1, 1], [1, 1, 1]]), ("full", "sparse"))
    assert hp.share() == pytest.approx({"full": 1 / 6, "sparse": 5 / 6})
    assert hp.density({"sparse": 0.2}) == pytest.approx(1 / 6 + 5 / 6 * 0.2)
    assert hp.to_mask().shape == (2, 3, 2)
    assert "full=0.17" in repr(hp)
    q, k, _ = make_qkv(2, 6, 3, 8, 8, 4)
    hp.validate(q, k)
    with pytest.raises(ValueError, match="values must lie"):
        HeadPlan(torch.full((2, 3), 2), ("full", "sparse")).validate(q, k)
    with pytest.raises(ValueError, match=r"\[B, Hkv\]"):
        HeadPlan(torch.zeros(2, 6, dtype=torch.long), ("a",)).validate(q, k)
    with pytest.raises(ValueError, match="unique"):
        HeadPlan(torch.zeros(2, 3, dtype=torch.long), ("a", "a"))


def test_dense_plan():
    p = DensePlan(3, 5)
    assert p.to_mask().shape == (1, 1, 3, 5) and p.density() == 1.0
    assert repr(p) == "DensePlan(q_len=3, kv_len=5, causal=True)"
    with pytest.raises(ValueError, match="kv_len >= q_len"):
        DensePlan(5, 3)
