"""Decode by the prefill's plan (selector ``prefill_blocks``): each generated token reads the key
blocks the prompt's last query block read plus every block after the prompt."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnzoo
from attnzoo import ops
from attnzoo.plans import BlockPlan, DensePlan, PrefillRow
from attnzoo.stack import CallContext

from .conftest import make_qkv, random_block_plan, rel_err, small_llama

XA = {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.8, "chunk_size": 64}
SPEC = {"name": "reuse", "default": {"selector": XA, "op": "block_sparse",
                                     "decode": {"selector": {"name": "prefill_blocks"}, "op": "block_sparse"}}}


def _expected_blocks(plan: BlockPlan, length: int, kv_len: int, b: int, h: int) -> set[int]:
    """Loops: the plan's row at the last real query's block, the blocks before the prompt's end
    block, and every block from there on."""
    qb = (length - 1) // plan.block_q
    row = plan.kv_indices[b, h, qb, : int(plan.kv_counts[b, h, qb])].tolist()
    start = length // plan.block_k
    return {x for x in row if x < start} | set(range(start, -(-kv_len // plan.block_k)))


@pytest.mark.parametrize("pad", [False, True])
def test_prefill_row_decode_plan_is_the_row_and_the_new_blocks(pad):
    B, H, N, bs = 3, 2, 300, 16
    plan = random_block_plan(B, H, N, N, bs, bs, p=0.3, seed=4)
    kpm = None
    lengths = [N] * B
    if pad:  # start-aligned: each sequence's real tokens first
        lengths = [300, 257, 100]
        kpm = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    row = PrefillRow.of(plan, kpm)
    for kv_len in (N, N + 1, N + 40):
        dp = row.decode_plan(kv_len)
        assert isinstance(dp, BlockPlan) and dp.q_len == 1 and dp.kv_len == kv_len
        dp.check_indices()
        for b in range(B):
            one = row.select(b).decode_plan(kv_len)
            for h in range(H):
                got = dp.kv_indices[b, h, 0, : int(dp.kv_counts[b, h, 0])].tolist()
                assert got == sorted(_expected_blocks(plan, lengths[b], kv_len, b, h)), (b, h, kv_len)
                assert one.kv_indices[0, h, 0, : int(one.kv_counts[0, h, 0])].tolist() == got


def test_a_decode_step_reads_the_prompts_blocks():
    """Through a stack: the prompt keeps its row in the layer cache; a decode step's output is the
    reference attention over that row's blocks and the blocks after the prompt, not dense."""
    stack = attnzoo.build(SPEC)
    q, k, v = make_qkv(2, 4, 2, 320, 320, 16, seed=5)
    q, k = q * 3, k * 3  # sharper scores: XAttention leaves blocks out
    N = 300
    cache: dict = {}
    stack(0, q[:, :, :N], k[:, :, :N], v[:, :, :N], CallContext(layer_idx=0, cache=cache))
    prefill_plan = attnzoo.create("selector", XA)(q[:, :, :N], k[:, :, :N], CallContext())
    assert isinstance(prefill_plan, BlockPlan) and prefill_plan.density() < 0.9
    for n in (N + 1, N + 20):
        q1, kn, vn = q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n]
        out = stack(0, q1, kn, vn, CallContext(layer_idx=0, cache=cache, decode=True))
        mask = torch.zeros(2, 4, 1, n, dtype=torch.bool)
        for b in range(2):
            for h in range(4):
                for blk in _expected_blocks(prefill_plan, N, n, b, h // (4 // prefill_plan.heads)):
                    mask[b, h, 0, blk * 16:(blk + 1) * 16] = True
        ref = torch.nn.functional.scaled_dot_product_attention(
            q1.double(), kn.double().repeat_interleave(2, 1), vn.double().repeat_interleave(2, 1), attn_mask=mask)
        assert rel_err(out, ref) <= 1e-5
        assert rel_err(ops.dense(q1, kn, vn), out) > 1e-3, "the decode step read every key"
    # without a kept row (a fresh cache: the prompt ran elsewhere) the step reads the whole cache
    fresh = stack(0, q[:, :, N:N + 1], k[:, :, :N + 1], v[:, :, :N + 1],
                  CallContext(layer_idx=0, cache={}, decode=True))
    assert rel_err(fresh, ops.dense(q[:, :, N:N + 1], k[:, :, :N + 1], v[:, :, :N + 1])) <= 1e-5
    sel = attnzoo.create("selector", {"name": "prefill_blocks"})
    assert isinstance(sel(q, k, CallContext(cache=cache)), DensePlan), "a prefill call is dense"


@torch.no_grad()
def test_generate_left_padded_batch_equals_each_prompt_alone():
    model = small_llama("cpu")
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 128, (2, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :45] = 0
    kw = dict(max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with attnzoo.patch(model, SPEC):
            batch = model.generate(input_ids=ids, attention_mask=mask, **kw)
            alone = [model.generate(input_ids=ids[b:b + 1, 45 * b:], **kw) for b in range(2)]
    for b in range(2):
        assert torch.equal(batch[b, 45 * b:], alone[b][0]), f"sequence {b}"
