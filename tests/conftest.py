"""Shared helpers: relative error, random plans/inputs, tolerance lookup."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter. Triton reads the switch
# when a kernel is defined; attnzoo imports its kernel modules lazily, at first call.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attnzoo import settings  # noqa: E402
from attnzoo.plans import BlockPlan, TokenPlan  # noqa: E402


@pytest.fixture
def setting():
    """``setting(name=value, ...)``: override attnzoo switches until the test ends (each call
    stacks on the ones before, as ``attnzoo.settings.override`` does)."""
    with contextlib.ExitStack() as stack:
        yield lambda **values: stack.enter_context(settings.override(**values))


def reset_flex() -> None:
    """Forget this process's compiled flex and its failures (tests that drive flex past dynamo's
    recompile limit call it, so later flex tests run instead of skipping)."""
    import importlib

    bs = importlib.import_module("attnzoo.ops.block_sparse")
    bs._FLEX_FAILED.clear()
    bs._compiled_flex.cache_clear()
    torch._dynamo.reset()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x - ref| / max|ref| (flash-linear-attention style, robust to tiny entries)."""
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.abs().max().clamp_min(1e-12)
    return float((x - ref).abs().max() / denom)


def assert_lse_close(lse, ref_lse, tol):
    """Same -inf rows, finite rows within ``tol`` relative error."""
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows with no visible key differ"
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert rel_err(lse[fin], ref_lse[fin]) <= tol


def make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def padding_mask(B, Nk, kind: str, seed=0):
    """None, or a [B, Nk] mask with left/right padding of varying length (batch 0 unpadded)."""
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(B, Nk, dtype=torch.bool)
    for b in range(1, B):
        n = int(torch.randint(1, max(2, Nk // 2), (1,), generator=g))
        if kind == "left":
            m[b, :n] = False
        else:
            m[b, Nk - n:] = False
    return m


def random_block_plan(B, H, Nq, Nk, bq, bk, p=0.4, seed=0, causal=True, poison=True):
    """A random valid plan; unused index slots are filled with garbage (they must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    full = BlockPlan.full(B, H, Nq, Nk, bq, bk, causal=causal).to_block_mask()
    bm = (torch.rand(full.shape, generator=g) < p) & full
    plan = BlockPlan.from_block_mask(bm, bq, bk, Nq, Nk, causal)
    if poison:
        slots = torch.arange(plan.max_blocks) >= plan.kv_counts[..., None]
        junk = torch.randint(-5, plan.num_kv_blocks + 5, plan.kv_indices.shape, generator=g,
                             dtype=plan.kv_indices.dtype)
        plan = BlockPlan(torch.where(slots, junk, plan.kv_indices), plan.kv_counts, bq, bk, Nq, Nk,
                         causal)
    return plan


def random_token_plan(B, H, N, keep=0.5, seed=0, key_padding_mask=None, width=None):
    """``width``: the plan's static width (a capped selector's), here the longest head's count
    plus ``width`` extra tail slots."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, H, N, generator=g) < keep
    mask[..., -1] = True
    if key_padding_mask is not None:
        mask &= key_padding_mask[:, None, :]
    return TokenPlan.from_keep_mask(mask, None if width is None else int(mask.sum(-1).max()) + width)



def small_llama(device="cpu", sharpen: float = 6.0):
    """A 4-layer random Llama with the head dim of the shipped presets (64; 2/1 heads), its query and
    key projections scaled by ``sharpen``: random weights attend almost uniformly, and threshold
    selectors then keep every block, so the scores are made sharper, as trained models have them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model.to(device)
