"""Plan metrics: density, attention recall, relative output error.

Attention recall is the share of each query row's true softmax mass that the plan keeps. For a
row that keeps key set S, that is sum_{j in S} exp(s_j) / sum_j exp(s_j) = exp(lse_S - lse_all),
so it comes straight from two ops' log-sum-exps — no N x N scores, blockwise by construction.
"""

from __future__ import annotations

import torch

from ..ops import block_sparse, dense, token_sparse
from ..plans import BlockPlan, DensePlan, HeadPlan, TokenPlan


def density(plan) -> float:
    """Fraction of causal-visible query-key pairs the plan computes (1.0 for dense)."""
    if isinstance(plan, HeadPlan):
        raise TypeError("a HeadPlan's density depends on its branches: use HeadPlan.density(branch_density)")
    if not hasattr(plan, "density"):
        raise TypeError(f"not a plan: {type(plan).__name__}")
    return float(plan.density())


@torch.no_grad()
def attention_recall(q, k, plan, *, key_padding_mask=None, reduce: bool = True):
    """Mean over query rows (and heads) of the true attention mass the plan keeps.

    Rows that see no real key are left out. For a TokenPlan, dropped query rows keep 0.
    Returns a float, or ``[B, Hq, Nq]`` per-row recall (NaN for rows without keys) if not reduced.
    """
    causal = getattr(plan, "causal", True)
    _, lse_all = dense(q, k, k, causal=causal, key_padding_mask=key_padding_mask, return_lse=True)
    if isinstance(plan, DensePlan):
        lse_kept = lse_all
    elif isinstance(plan, BlockPlan):
        _, lse_kept = block_sparse(q, k, k, plan, key_padding_mask=key_padding_mask, return_lse=True)
    elif isinstance(plan, TokenPlan):
        _, lse_kept = token_sparse.attention(q, k, k, plan, key_padding_mask=key_padding_mask,
                                             return_lse=True)
    else:
        raise TypeError(f"attention_recall needs a Dense/Block/TokenPlan, got {type(plan).__name__}")
    has_keys = torch.isfinite(lse_all)
    recall = torch.exp(lse_kept - torch.where(has_keys, lse_all, 0.0))
    recall = torch.where(has_keys, recall.clamp(max=1.0), float("nan"))
    if not reduce:
        return recall
    return float(recall[has_keys].mean())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| over all elements."""
    ref = ref.detach().double()
    return float((out.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
