"""Threshold allocation under a density budget (``attnzoo.allocation``): the curves are the
selector's own selections, the allocation spends the budget where it buys the most recall."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnzoo.allocation import allocate, budget_thresholds, head_curves, threshold_curves
from attnzoo.calibration import exact_block_mass
from attnzoo.context import CallContext
from attnzoo.fitting import fit_xattention
from attnzoo.selectors.xattention import XAttention

from .conftest import make_qkv

TAUS = (0.2, 0.5, 0.8, 0.9, 0.97, 0.999, 1.0)


@pytest.mark.parametrize("nq,nk", [(200, 200), (120, 200), (64, 64)])
def test_head_curves_are_what_the_selector_keeps(nq, nk):
    q, k, _ = make_qkv(2, 4, 2, nq, nk, 16, seed=nq + nk)
    q = q * 3  # peaked attention: the taus select different blocks
    b = 16
    w = torch.cat([w for _, _, w in XAttention(stride=4, block_size=b, chunk_size=64).block_scores(q, k)], 2)
    exact = exact_block_mass(q, k, b)
    got = head_curves(w, exact, nq, nk, b, TAUS)
    rows = exact.sum(-1) > 0
    assert torch.equal(got["rows"], rows.sum((0, 2)).double())
    kept_before = None
    for t, tau in enumerate(TAUS):
        mask = XAttention(threshold=tau, stride=4, block_size=b, chunk_size=64)(q, k, CallContext()).to_block_mask()
        kept = mask.sum((0, 2, 3)).double()
        recall = ((exact * mask).sum(-1) / exact.sum(-1).clamp_min(1e-30) * rows).sum((0, 2)).double()
        assert torch.equal(got["kept"][:, t], kept), tau
        torch.testing.assert_close(got["recall"][:, t], recall, rtol=1e-5, atol=1e-6)
        if kept_before is not None:
            assert bool((kept >= kept_before).all())
        kept_before = kept
    assert torch.equal(got["kept"][:, -1], got["visible"]), "tau 1 keeps every causal block"
    torch.testing.assert_close(got["recall"][:, -1], got["rows"])
    assert len(set(got["kept"][0].tolist())) > 3, "the taus must select differently, or the test proves little"


def test_head_curves_refuse_mismatched_scores():
    with pytest.raises(ValueError, match=r"w and exact must both be \[B, H, Nqb, Nkb\]"):
        head_curves(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4), 3, 4, 1)
    with pytest.raises(ValueError, match=r"taus must be values in \(0, 1\]"):
        head_curves(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), 3, 3, 1, taus=(0.5, 1.5))


def test_allocate_spends_the_budget_where_it_buys_recall():
    # head 0 gains 0.49 recall for 0.1 density, head 1 only 0.4 for 0.4
    recall = torch.tensor([[0.5, 0.99, 1.0], [0.2, 0.6, 1.0]])
    density = torch.tensor([[0.1, 0.2, 1.0], [0.1, 0.5, 1.0]])
    assert allocate(recall, density, 0.2).tolist() == [1, 0]
    assert allocate(recall, density, 0.35).tolist() == [1, 1]
    assert allocate(recall, density, 1.0).tolist() == [2, 2]
    assert allocate(recall, density, 0.05).tolist() == [0, 0], "infeasible: the sparsest choice"
    with pytest.raises(ValueError, match="budget must be a density"):
        allocate(recall, density, 0.0)
    with pytest.raises(ValueError, match=r"recall and density must both be \[heads, taus\]"):
        allocate(recall, density[:, :2], 0.5)


def test_allocate_is_optimal_on_concave_curves():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        # concave recall in density: decreasing slopes
        d = torch.cat([torch.zeros(3, 1), torch.rand(3, 4, generator=g)], 1).cumsum(1) / 5 + 0.05
        slopes = torch.rand(3, 4, generator=g).sort(1, descending=True).values
        r = torch.cat([torch.zeros(3, 1), slopes * d.diff(1)], 1).cumsum(1)
        for budget in (0.2, 0.3, 0.45, 0.6):
            idx = allocate(r, d, budget)
            spent = float(d.gather(1, idx[:, None]).mean())
            assert spent <= budget + 1e-9
            best = max((float(sum(r[h, c] for h, c in enumerate(combo))) for combo in itertools.product(range(5),
                        repeat=3) if float(sum(d[h, c] for h, c in enumerate(combo))) / 3 <= budget), default=None)
            got = float(r.gather(1, idx[:, None]).sum())
            # the Lagrangian reaches the concave hull: within one step of the discrete optimum
            assert best is None or got >= best - float(r.diff(1).max()) - 1e-9


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:  # peaked attention, so thresholds matter
        layer.self_attn.q_proj.weight.data *= 8
    return model


def test_budget_calibration_meets_its_budget_on_held_out_prompts(tiny_llama):
    texts = [torch.randint(0, 128, (1, 640), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    held = [torch.randint(0, 128, (1, 640), generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    curves = threshold_curves(tiny_llama, texts, stride=4, block_size=16)
    assert sorted(curves) == [0, 1, 2] and curves[1][0].shape == (4, 57)
    lo = budget_thresholds(curves, 0.3, stride=4, block_size=16, dense_layers=[0])
    hi = budget_thresholds(curves, 0.6, stride=4, block_size=16, dense_layers=[0])
    assert lo["thresholds"][0] == [1.0] * 4, "a dense layer spends none of the budget"
    assert lo["expected"]["density"] <= 0.3 and hi["expected"]["density"] <= 0.6
    assert hi["expected"]["recall"] > lo["expected"]["recall"]
    cal = fit_xattention(tiny_llama, texts, density_budget=0.55, held_out=held, stride=4, block_size=16,
                         dense_layers="0", progress=False)
    assert cal["held_out_density"] <= 0.55 * 1.01 and cal["stack_density_budget"] == 0.55
    assert cal["tries"][0]["held_out_density"] == cal["held_out_density"] or len(cal["tries"]) > 1
    with pytest.raises(ValueError, match="dense layers alone use"):
        fit_xattention(tiny_llama, texts, density_budget=0.3, held_out=held, stride=4, block_size=16,
                       dense_layers="0", progress=False)
    with pytest.raises(ValueError, match="needs held_out prompts"):
        fit_xattention(tiny_llama, texts, density_budget=0.5, stride=4, block_size=16, progress=False)


def test_token_coverage_fit_takes_the_largest_tau_that_keeps_the_recall(tiny_llama):
    """``fit_token_coverage``: recall rises as the coverage tau falls (fewer tokens dropped); the
    fit stops at the first (largest) tau that meets the target, and takes the smallest when none does."""
    from attnzoo.fitting import fit_token_coverage, with_coverage

    held = [torch.randint(0, 128, (1, 640), generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    spec = {"default": {"op": "dense"},
            "layers": {"1-2": {"compress": {"name": "token_coverage", "coverage": 0.05, "window": 32,
                                            "min_tokens": 64}, "inner": {"op": "dense"}}}}
    assert with_coverage(spec, 0.01)["layers"]["1-2"]["compress"]["coverage"] == 0.01
    assert spec["layers"]["1-2"]["compress"]["coverage"] == 0.05, "the spec itself is not changed"
    taus = (0.3, 0.1, 0.01, 0.001)
    every = fit_token_coverage(tiny_llama, spec, held, 1.0, coverages=taus, progress=False)
    recalls = [every["candidates"][t]["recall"] for t in taus]
    assert every["coverage"] == 0.001 and len(every["candidates"]) == 4, "none reaches 1.0: the smallest"
    assert every["met"] is False
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1], recalls
    densities = [every["candidates"][t]["density"] for t in taus]
    assert densities == sorted(densities) and densities[0] < 1
    mid = (recalls[1] + recalls[2]) / 2
    got = fit_token_coverage(tiny_llama, spec, held, mid, coverages=taus, progress=False)
    assert got["coverage"] == 0.01 and list(got["candidates"]) == [0.3, 0.1, 0.01], "stops at the first that meets"
    assert got["met"] is True
    with pytest.raises(ValueError, match="target_recall must lie in"):
        fit_token_coverage(tiny_llama, spec, held, 1.5, progress=False)
    with pytest.raises(ValueError, match="compresses no layer"):
        fit_token_coverage(tiny_llama, {"default": {"op": "dense"}}, held, 0.9, progress=False)
