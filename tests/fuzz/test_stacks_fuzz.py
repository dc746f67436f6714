"""Selectors through their ops, and stacks in a tiny random Llama, under random padding.

- every registered selector (built-in and the README's example): its plan validates, the op for
  its plan kind agrees with the reference under that plan, and a layer run through the stack
  gives each left- or right-padded sequence exactly what the sequence gives alone;
- stacks patched into a tiny random Llama: a padded batch's logits equal each prompt's alone, and
  left-padded batched ``generate()`` produces each prompt's own tokens;
- the shipped presets that fit any model, sparse at every length, in a small Llama with their own
  head dim, on prompts long enough for their sinks and windows to leave blocks out.

On the ``gpu`` profile everything runs on the GPU (the CUDA backends the stacks dispatch to).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo import ops
from attnzoo.stack import CallContext
from attnzoo.stack.padding import StartAligned

from ..conftest import assert_lse_close, rel_err, small_llama
from ..test_selector_matrix import build as build_selector  # also registers the README's example
from ..test_selector_matrix import run_plan
from .conftest import DEVICE, count, examples
from .strategies import problems


def _op_for(plan_kind):
    return {"block": "block_sparse", "token": "token_sparse", "dense": "dense"}[plan_kind]


@pytest.mark.parametrize("name", attnzoo.available("selector"))
@given(data=st.data())
@examples(ci=6, long=250, gpu=120)
def test_selector_plan_through_its_op(name, data):
    p = data.draw(problems(causal=True, dtypes=(torch.float32,), max_n=300, min_nk=2, device=DEVICE))
    sel = build_selector(name)
    if p.kpm is not None and bool((~p.kpm[:, 0] & p.kpm.any(-1)).any()):
        # a sequence starts with padding: refused directly; the stack rolls it to start at row 0
        with pytest.raises(ValueError, match="left-padded key_padding_mask"):
            sel(p.q, p.k, CallContext(key_padding_mask=p.kpm))
        if p.q.shape[2] != p.k.shape[2]:  # queries are the last rows: the stack cuts each sequence instead
            count(f"selector/{name} (left padding refused)")
            return
        al = StartAligned(p.kpm)
        p.q, p.k, p.v, p.kpm = al.align(p.q), al.align(p.k), al.align(p.v), al.mask
    plan = sel(p.q, p.k, CallContext(key_padding_mask=p.kpm, starts_aligned=True))
    plan.validate(p.q, p.k)
    out, lse = run_plan(p.q, p.k, p.v, plan, p.kpm)
    ref, ref_lse = ops.reference(p.q, p.k, p.v, plan, key_padding_mask=p.kpm, return_lse=True)
    count(f"selector/{name}")
    assert rel_err(out, ref) <= 1e-4 or ref.abs().max() == 0
    assert_lse_close(lse, ref_lse, 1e-4)


@pytest.mark.parametrize("name", attnzoo.available("selector"))
@given(data=st.data())
@examples(ci=6, long=250, gpu=120)
def test_padded_layer_equals_each_sequence_alone(name, data):
    B = data.draw(st.integers(1, 3))
    side = data.draw(st.sampled_from(["left", "right"]))
    lengths = [data.draw(st.integers(1, 260)) for _ in range(B)]
    N = max(lengths)
    Hkv = data.draw(st.integers(1, 2))
    Hq = Hkv * data.draw(st.sampled_from([1, 2, 3]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(B, h, N, 16, generator=g).to(DEVICE) * 2 for h in (Hq, Hkv, Hkv))
    pos = torch.arange(N, device=DEVICE)[None, :]
    n = torch.tensor(lengths, device=DEVICE)[:, None]
    kpm = pos >= N - n if side == "left" else pos < n
    cls = attnzoo.registry.get("selector", name)
    op = _op_for(cls.plan_kind)
    node = {"compress": {"name": name, **getattr(cls, "small_config", {})}, "inner": {"op": "dense"}} \
        if cls.plan_kind == "token" else {"selector": {"name": name, **getattr(cls, "small_config", {})}, "op": op}
    stack = attnzoo.build({"name": "fuzz", "default": node})
    out = stack(0, q, k, v, CallContext(key_padding_mask=kpm, layer_idx=0))
    count(f"padding_invariance/{name}")
    for b, L in enumerate(lengths):
        rows = slice(N - L, N) if side == "left" else slice(0, L)
        alone = stack(0, q[b:b + 1, :, rows], k[b:b + 1, :, rows], v[b:b + 1, :, rows],
                      CallContext(layer_idx=0))
        # (on a GPU, kernels may sum a shorter sequence in another order: fp32 rounding)
        tol = 1e-5 if DEVICE == "cpu" else 1e-4
        assert (out[b:b + 1, :, rows] - alone).abs().max() <= tol, f"sequence {b} ({side} padded, {L} real)"


# -- stacks in a model ------------------------------------------------------------------------------

_SMALL = {
    "streaming": {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"},
    "topk": {"selector": {"name": "topk_blocks", "block_size": 16, "top_k": 3}, "op": "block_sparse"},
    "xattention": {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.8,
                                "chunk_size": 64}, "op": "block_sparse"},
}
STACKS = {
    "full": {"op": "dense"},
    **_SMALL,
    "token-sparse-streaming": {"compress": {"name": "token_coverage", "coverage": 0.05, "window": 16,
                                            "min_tokens": 32}, "inner": _SMALL["streaming"]},
    "table-hybrid": {"router": {"name": "table", "default": "sparse", "heads": {0: ["full", "sparse"]}},
                     "branches": {"full": {"op": "dense"}, "sparse": _SMALL["xattention"]}},
    "quest-decode": {**_SMALL["xattention"], "decode": {"selector": {"name": "quest", "page_size": 16, "budget": 32},
                                                       "op": "block_sparse"}},
    "quest-decode-kv": {"op": "dense", "decode": {"selector": {"name": "quest", "page_size": 16, "budget": 32,
                                                               "per_kv_head": True}, "op": "block_sparse"}},
    "elastic": {"router": {"name": "elastic", "head_dim": 16, "seed": 3},
                "branches": {"full": {"op": "dense"}, "sparse": _SMALL["streaming"]}},
}


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval().to(DEVICE)
    model.generation_config.eos_token_id = None
    return model


def _batch(prompts, side):
    N = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), N, dtype=torch.long)
    mask = torch.zeros(len(prompts), N, dtype=torch.long)
    for b, p in enumerate(prompts):
        rows = slice(N - len(p), N) if side == "left" else slice(0, len(p))
        ids[b, rows], mask[b, rows] = torch.tensor(p), 1
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("stack", list(STACKS))
@given(data=st.data())
@examples(ci=2, long=40, gpu=15)
@torch.no_grad()
def test_padded_model_equals_each_prompt_alone(tiny, stack, data):
    lengths = [data.draw(st.integers(20, 180)) for _ in range(data.draw(st.integers(2, 3)))]
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in lengths]
    side = data.draw(st.sampled_from(["left", "right"]))
    ids, mask = _batch(prompts, side)
    spec = {"name": stack, "default": STACKS[stack]}
    generate = side == "left" and data.draw(st.booleans())  # HF generates after left padding only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the elastic router has no trained weights here
        # each prompt's own positions, as generate() gives a left-padded batch: without them RoPE
        # places a left-padded prompt pad-count positions later, which changes q.k in the last bits,
        # and a discrete selection (token_coverage) can flip on such a near-tie (0.108 logits once)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with attnzoo.patch(tiny, spec):
            logits = tiny(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            alone = [tiny(input_ids=torch.tensor([p], device=DEVICE)).logits[0] for p in prompts]
            if generate:
                new = data.draw(st.integers(1, 10))
                batched = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
                each = [tiny.generate(input_ids=torch.tensor([p], device=DEVICE), max_new_tokens=new,
                                      do_sample=False)[0, -new:] for p in prompts]
    count(f"model/{stack}")
    N = ids.shape[1]
    for b, p in enumerate(prompts):
        rows = slice(N - len(p), N) if side == "left" else slice(0, len(p))
        assert (logits[b, rows] - alone[b]).abs().max() <= 1e-4, f"prompt {b} ({side} padded)"
        if generate:
            assert batched[b, -new:].tolist() == each[b].tolist(), f"prompt {b}: generated tokens differ"


# presets that fit any model (the others are fitted to the embedded model's shape, or route with a
# router trained for it: tests/test_your_model.py and tests/test_architectures.py cover refusing them)
ANY_MODEL_PRESETS = ["streaming", "xattention", "topk-blocks", "token-sparse", "token-sparse-xattention"]


@pytest.fixture(scope="module")
def small():
    return small_llama(DEVICE)


@pytest.mark.parametrize("preset", ANY_MODEL_PRESETS)
@given(data=st.data())
@examples(ci=1, long=6, gpu=12)
@torch.no_grad()
def test_shipped_preset_padded_equals_each_prompt_alone(small, preset, data):
    from attnzoo.config import load_config, preset_spec, without_dense_below
    from attnzoo.stack import DensityMeter

    lengths = [data.draw(st.integers(1800, 3000)) for _ in range(2)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]
    side = data.draw(st.sampled_from(["left", "right"]))
    ids, mask = _batch(prompts, side)
    spec = without_dense_below(load_config(preset_spec(preset)))  # sparse at these lengths on a GPU too
    meter = DensityMeter()
    with attnzoo.patch(small, spec, meter=meter):
        logits = small(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        density = min(meter.layers.values())  # the sparsest layer (the first two stay dense)
        alone = [small(input_ids=torch.tensor([p], device=DEVICE)).logits[0] for p in prompts]
    count(f"preset/{preset}")
    assert density < 0.99, f"{preset} kept {density:.3f} of the pairs: the comparison would be dense"
    N = ids.shape[1]
    for b, p in enumerate(prompts):
        rows = slice(N - len(p), N) if side == "left" else slice(0, len(p))
        assert (logits[b, rows] - alone[b]).abs().max() <= 1e-4, f"prompt {b} ({side} padded, {len(p)} tokens)"
