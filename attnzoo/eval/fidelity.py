"""Logit fidelity: how far a stack's next-token distributions move from full attention's.

Over the plain-text positions of a prompt (a copy prompt's ``window``), per position:
``KL(full || stack) = sum_v p_full(v) (log p_full(v) - log p_stack(v))`` in nats, and whether the
two argmax tokens agree. Both come from one forward pass per stack over the same tokens. KL on
plain text catches local damage (a stack that loses the last few hundred tokens' detail) but not
long-range loss: a local window predicts ordinary text well, so it is read beside copy accuracy.
"""

from __future__ import annotations

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax over the vocabulary (bf16 logits lose the tails KL reads)."""
    return torch.log_softmax(logits.float(), dim=-1)


def logit_fidelity(full_logp: torch.Tensor, stack_logits: torch.Tensor) -> dict:
    """``{"kl": mean nats, "top1": agreement}`` of ``stack_logits`` against full attention's
    log-probabilities ``full_logp`` (same positions, ``[..., V]``)."""
    if full_logp.shape != stack_logits.shape:
        raise ValueError(f"full_logp {tuple(full_logp.shape)} and stack_logits {tuple(stack_logits.shape)} "
                         f"must cover the same positions and vocabulary")
    lp = log_probs(stack_logits.to(full_logp.device))
    kl = (full_logp.exp() * (full_logp - lp)).sum(-1).clamp_min(0.0)  # rounding can dip a hair below 0
    top1 = (full_logp.argmax(-1) == lp.argmax(-1)).float()
    return {"kl": float(kl.mean()), "top1": float(top1.mean())}
