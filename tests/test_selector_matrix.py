"""One matrix over every registered selector — including ones added later: a module imported before
the tests collect, or a plugin installed in the ``attnzoo.plugins`` entry-point group, as the
README's example is (``pip install -e examples/vertical_slash``).

Each selector runs at its ``small_config`` (if it declares one) on several shapes and must:
return a Dense/Block/TokenPlan that validates; be pure (same input, same plan); treat batch
elements independently; respect padding; and, run through the op for its plan kind, agree with
``ops.reference`` given the same plan.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo import ops
from attnzoo.context import CallContext
from attnzoo.eval import attention_recall
from attnzoo.ops import token_sparse
from attnzoo.plans import BlockPlan, DensePlan, TokenPlan
from attnzoo.stack.padding import StartAligned

from .conftest import assert_lse_close, make_qkv, padding_mask, rel_err

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vertical_slash"

SHAPES = [  # B, Hq, Hkv, Nq, Nk, pad
    (2, 6, 2, 300, 300, "none"),
    (3, 4, 4, 257, 257, "left"),
    (2, 8, 2, 100, 333, "right"),  # chunked prefill
]


def small_config(name) -> dict:
    """The selector's config for short test sequences (its ``small_config``, if it declares one)."""
    return {"name": name, **getattr(attnzoo.registry.get("selector", name), "small_config", {})}


def build(name):
    return attnzoo.create("selector", small_config(name))


def run_plan(q, k, v, plan, kpm):
    if isinstance(plan, BlockPlan):
        return ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=True)
    if isinstance(plan, TokenPlan):
        return token_sparse.attention(q, k, v, plan, key_padding_mask=kpm, return_lse=True)
    if isinstance(plan, DensePlan):
        return ops.dense(q, k, v, causal=plan.causal, key_padding_mask=kpm, return_lse=True)
    raise AssertionError(f"selector returned {type(plan).__name__}, not a plan")


def plan_mask(plan):
    return plan.to_mask() if not isinstance(plan, DensePlan) else None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}:{}-N{}x{}-{}".format(*s))
@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_selector_contract(name, shape):
    B, Hq, Hkv, Nq, Nk, pad = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, 32, seed=7)
    q, k = q * 2, k * 2
    kpm = padding_mask(B, Nk, pad)
    sel = build(name)
    ctx = CallContext(key_padding_mask=kpm)
    if pad == "left":  # directly: refused (see test_left_padding_below_the_stack); aligned: the contract
        with pytest.raises(ValueError, match="left-padded key_padding_mask"):
            sel(q, k, ctx)
        al = StartAligned(kpm)
        q, k, v, kpm = al.align(q), al.align(k), al.align(v), al.mask
        ctx = CallContext(key_padding_mask=kpm, starts_aligned=True)
    plan = sel(q, k, ctx)
    assert isinstance(plan, (DensePlan, BlockPlan, TokenPlan))
    plan.validate(q, k)
    # pure
    again = sel(q, k, ctx)
    if plan_mask(plan) is not None:
        assert torch.equal(plan_mask(plan), plan_mask(again))
    # batch elements independent: permuting the batch permutes the plans
    perm = torch.arange(B).flip(0)
    permuted = sel(q[perm], k[perm], CallContext(key_padding_mask=None if kpm is None else kpm[perm],
                                                 starts_aligned=ctx.starts_aligned))
    assert type(permuted) is type(plan)
    if plan_mask(plan) is not None:
        assert torch.equal(plan_mask(permuted), plan_mask(plan)[perm])
    # the op for the plan's kind agrees with the reference under the same plan
    out, lse = run_plan(q, k, v, plan, kpm)
    ref, ref_lse = ops.reference(q, k, v, plan, key_padding_mask=kpm, return_lse=True)
    assert rel_err(out, ref) <= 1e-4
    assert_lse_close(lse, ref_lse, 1e-4)
    r = attention_recall(q, k, plan, key_padding_mask=kpm)
    assert 0.0 <= r <= 1.0 + 1e-6


@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_padding_does_not_change_plans(name):
    """A right-padded sequence (garbage in the padding) gets the same plan as the sequence alone."""
    sel = build(name)
    n, N = 203, 260
    q, k, _ = make_qkv(1, 4, 2, N, N, 16, seed=9)
    q[:, :, n:], k[:, :, n:] = 50.0, -50.0  # garbage that would dominate if it leaked
    kpm = torch.zeros(1, N, dtype=torch.bool)
    kpm[:, :n] = True
    padded = sel(q, k, CallContext(key_padding_mask=kpm))
    alone = sel(q[:, :, :n].contiguous(), k[:, :, :n].contiguous())
    assert type(padded) is type(alone)
    if isinstance(alone, BlockPlan):
        assert torch.equal(padded.to_mask()[..., :n, :n], alone.to_mask())
    elif isinstance(alone, TokenPlan):
        assert torch.equal(padded.keep_mask()[..., :n], alone.keep_mask())
        assert not padded.keep_mask()[..., n:].any()


def _as_layer(name):
    """A one-layer stack running the selector as the stack would: block and dense plans drive a
    Branch, token plans a Compressed node around dense attention."""
    cfg = small_config(name)
    kind = attnzoo.registry.get("selector", name).plan_kind
    node = {"compress": cfg, "inner": {"op": "dense"}} if kind == "token" else {"selector": cfg, "op": "block_sparse"}
    return attnzoo.build({"name": "m", "default": node})


@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_plan_kind_is_the_declared_one(name):
    """What a selector declares (``plan_kind``) is what the stack wires it by; it may fall back to a
    dense plan (short inputs), never to another kind."""
    sel = build(name)
    q, k, _ = make_qkv(2, 4, 2, 300, 300, 32, seed=3)
    plan = sel(q, k, CallContext())
    assert plan.kind in (type(sel).plan_kind, "dense"), (name, plan.kind, type(sel).plan_kind)


def _left_out_or_dense(name, dense, alone):
    """A prompt's plan leaves pairs out (else the comparison above would be empty); a decode-only
    selector (``prefill = "dense"``) attends densely to a prompt instead."""
    if attnzoo.registry.get("selector", name).prefill == "dense":
        assert rel_err(dense, alone) <= 1e-5, f"{name} (prefill = 'dense') did not attend densely to a prompt"
    else:
        assert rel_err(dense, alone) > 1e-3, f"{name} kept every pair: the check would be empty"


@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_left_padded_layer_equals_each_sequence_alone(name):
    """Left padding (batched generate) through the stack: each sequence's rows equal the sequence
    run alone, for every registered selector (the stack realigns sequences to start at row 0)."""
    from attnzoo.stack import CallContext

    layer = _as_layer(name)
    q, k, v = make_qkv(3, 4, 2, 300, 300, 32, seed=11)
    q, k = q * 2, k * 2
    pads = (0, 13, 64)
    kpm = torch.arange(300)[None, :] >= torch.tensor(pads)[:, None]
    out = layer(0, q, k, v, CallContext(layer_idx=0, key_padding_mask=kpm))
    for b, p in enumerate(pads):
        alone = layer(0, q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], CallContext(layer_idx=0))
        assert rel_err(out[b:b + 1, :, p:], alone) <= 1e-5, f"{name}: sequence {b} ({p} pads)"
        dense = ops.dense(q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:])
        _left_out_or_dense(name, dense, alone)


def _devices():
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda",
                         marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_left_padding_below_the_stack(name, device):
    """A selector called directly (no stack) with a left-padded batch: a prefill and a chunked
    prefill are refused with an error naming the sequence and the way out; rolled to start at 0
    (``StartAligned``) and marked ``starts_aligned``, selector + op give each sequence exactly what
    it gives alone. (The issue's case: sink 16 / local 16, block 16, 8 pad tokens differed by 1.28.)"""
    sel = build(name)
    pads = (0, 8, 37)
    for nq in (300, 120):  # prefill; chunked prefill (the last 120 rows)
        q, k, v = (t.to(device) for t in make_qkv(3, 4, 2, nq, 300, 32, seed=21))
        q, k = q * 2, k * 2
        kpm = (torch.arange(300)[None, :] >= torch.tensor(pads)[:, None]).to(device)
        with pytest.raises(ValueError, match=r"sequence 1 starts at position 8.*inside a stack"):
            sel(q, k, CallContext(key_padding_mask=kpm))
        with pytest.raises(ValueError, match="left-padded"):
            sel(q, k, {"key_padding_mask": kpm})  # a dict context is checked too
    q, k, v = (t.to(device) for t in make_qkv(3, 4, 2, 300, 300, 32, seed=21))
    q, k = q * 2, k * 2
    kpm = (torch.arange(300)[None, :] >= torch.tensor(pads)[:, None]).to(device)
    al = StartAligned(kpm)
    plan = sel(al.align(q), al.align(k), CallContext(key_padding_mask=al.mask, starts_aligned=True))
    out = al.restore(run_plan(al.align(q), al.align(k), al.align(v), plan, al.mask)[0])
    for b, p in enumerate(pads):
        qa, ka, va = (t[b:b + 1, :, p:] for t in (q, k, v))
        alone = run_plan(qa, ka, va, sel(qa, ka, CallContext()), None)[0]
        assert rel_err(out[b:b + 1, :, p:], alone) <= 1e-5, f"{name}: sequence {b} ({p} pads)"
        _left_out_or_dense(name, ops.dense(qa, ka, va), alone)


@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_decode_step_batch_of_ragged_lengths(name):
    """Decode shapes: one new query per sequence against a cache, batch 3, ragged lengths left-padded
    as generate() builds them. A selector that keeps a plan while decoding (``decode = "plan"``)
    gives each sequence exactly what it gives alone, and its plan leaves keys out; the others
    attend densely over the cache."""
    layer = _as_layer(name)
    cls = attnzoo.registry.get("selector", name)
    N, pads = 400, (0, 37, 150)
    q, k, v = make_qkv(3, 4, 2, 1, N, 32, seed=13)
    q, k = q * 2, k * 2
    kpm = torch.arange(N)[None, :] >= torch.tensor(pads)[:, None]
    out = layer(0, q, k, v, CallContext(layer_idx=0, key_padding_mask=kpm, decode=True))
    for b, p in enumerate(pads):
        qa, ka, va = q[b:b + 1], k[b:b + 1, :, p:], v[b:b + 1, :, p:]
        alone = layer(0, qa, ka, va, CallContext(layer_idx=0, decode=True))
        assert rel_err(out[b:b + 1], alone) <= 1e-5, f"{name}: sequence {b} ({p} pads)"
        dense = ops.dense(qa, ka, va)
        if cls.decode == "plan":
            plan = build(name)(qa, ka, CallContext(decode=True))
            if plan.kind != "dense":
                assert plan.density() < 1 and rel_err(dense, alone) > 1e-4, f"{name} kept every key"
        else:
            assert rel_err(dense, alone) <= 1e-5, f"{name} (decode = 'dense') did not attend densely"


def test_readme_example_is_the_file_and_is_in_the_matrix():
    """The README's selector is examples/vertical_slash, installed as a plugin (an entry point in
    ``attnzoo.plugins``) by the README's test command: the matrix above finds it like any user's."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    assert (EXAMPLE / "vertical_slash.py").read_text().strip() in readme
    assert "vertical_slash" in attnzoo.available("selector"), (
        "the README's example plugin is not installed: pip install -e examples/vertical_slash")
    assert attnzoo.registry.plugins().get("vertical_slash = vertical_slash", "missing") is None


@pytest.mark.parametrize("name", attnzoo.available("selector"))
def test_selector_accepts_hf_layout(name):
    """transformers hands attention functions transposed, non-contiguous q/k/v."""
    B, H, Hkv, N, D = 2, 4, 2, 200, 16
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, N, H, D, generator=g) * 2).transpose(1, 2)
    k = (torch.randn(B, N, Hkv, D, generator=g) * 2).transpose(1, 2)
    v = torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    plan = build(name)(q, k)
    contiguous = build(name)(q.contiguous(), k.contiguous())
    if plan_mask(plan) is not None:
        assert torch.equal(plan_mask(plan), plan_mask(contiguous))
    out, _ = run_plan(q, k, v, plan, None)
    assert rel_err(out, ops.reference(q, k, v, plan)) <= 1e-4
