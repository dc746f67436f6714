"""Merging partial attentions over disjoint key sets through their log-sum-exp."""

from __future__ import annotations

import torch


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Combine (out, lse) of attention over key sets A and B into attention over A ∪ B.

    ``o*`` are ``[B, H, N, D]``, ``lse*`` are ``[B, H, N]`` (natural log, -inf where a row saw
    no key). Rows that saw no key in either set come out as zeros with lse = -inf; the
    arithmetic keeps gradients finite for them.
    """
    m = torch.maximum(lse1, lse2).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    s = w1 + w2
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    out = (o1.float() * (w1 / s_safe)[..., None] + o2.float() * (w2 / s_safe)[..., None])
    lse = torch.where(nonempty, m + torch.log(s_safe), torch.full_like(s, float("-inf")))
    return out.to(o1.dtype), lse


def masked_softmax_stats(scores: torch.Tensor, allowed: torch.Tensor):
    """Probabilities and lse of ``scores`` restricted to ``allowed`` (bool, broadcastable).

    Rows with nothing allowed give p = 0 and lse = -inf, with finite gradients.
    """
    s = scores.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    nonempty = z > 0
    z_safe = torch.where(nonempty, z, torch.ones_like(z))
    p = e / z_safe
    lse = torch.where(nonempty, m + torch.log(z_safe), torch.full_like(z, float("-inf")))
    return p, lse.squeeze(-1)


def masked_softmax_(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``scores`` over ``allowed`` (bool, broadcastable), overwriting ``scores``.

    Rows with nothing allowed come out as zeros. Two passes (fused softmax, NaN cleanup) instead
    of the six of ``masked_softmax_stats``: for selectors' estimate matrices, which need no lse
    and no gradient.
    """
    scores.masked_fill_(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num_(0.0)
