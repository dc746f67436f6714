"""Free-running agreement of generated tokens with full attention: how a stack's decode reads the cache.

Each prompt is plain text (CPython's documentation, the NIAH haystack) cut to a length; full
attention and the stack each generate ``new_tokens`` greedy tokens from it on their own (free
running, as a user sees them). Per prompt: the share of the ``new_tokens`` positions where the
stack's token equals full's, and the first position where they part. A stack whose decode step
reads the whole cache agrees exactly; a decode budget shows here as soon as it drops something
the next token needs. Scores carry the number of prompts and a bootstrap interval over prompts.
"""

from __future__ import annotations

import torch

from ..integrations.hf_patch import patch
from .niah import haystack_text
from .stats import bootstrap_ci

__all__ = ["text_prompts", "decode_agreement"]


def text_prompts(tok, length: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` plain-text prompts of ``length`` tokens, from spread-out places of the haystack."""
    ids = tok(haystack_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < length + n:
        ids = torch.cat([ids] * (1 + (length + n) // ids.numel()))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g).tolist()
    return [ids[s:s + length][None] for s in starts]


@torch.no_grad()
def _greedy(model, ids, new_tokens: int) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def decode_agreement(model, prompts, stacks: dict, new_tokens: int = 32) -> dict:
    """``{label: {"agreement", "ci", "first_divergence", "prompts"}}`` for each stack (anything
    ``attnzoo.build`` takes) against full attention's own greedy tokens on the same prompts."""
    if not prompts:
        raise ValueError("decode_agreement needs at least one prompt")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.ndim != 2 or p.shape[0] != 1:
            raise ValueError(f"prompts[{i}] must be token ids [1, N] (one prompt each), got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # every continuation is new_tokens long
    try:
        with patch(model, {"name": "full", "default": {"op": "dense"}}):
            full = [_greedy(model, p.to(device), new_tokens) for p in prompts]
        out = {}
        for label, stack in stacks.items():
            shares, parts = [], []
            with patch(model, stack):
                for p, ref in zip(prompts, full, strict=True):
                    got = _greedy(model, p.to(device), new_tokens)
                    same = [a == b for a, b in zip(got, ref, strict=True)]
                    shares.append(sum(same) / new_tokens)
                    parts.append(same.index(False) if False in same else new_tokens)
            out[label] = {"agreement": sum(shares) / len(shares), "ci": list(bootstrap_ci(shares)),
                          "first_divergence": sum(parts) / len(parts), "prompts": len(prompts),
                          "new_tokens": new_tokens}
        return out
    finally:
        model.generation_config.eos_token_id = eos
