"""fp32 masked attention from ``plan.to_mask()``: the ground truth every backend is tested against.

Materialises the full ``[B, H, Nq, Nk]`` mask and scores on purpose — it must be obviously
correct, not fast. Only this module (and tests) may build N x N tensors.
"""

from __future__ import annotations

import torch

from ..plans import DensePlan
from ._checks import check_qkv, default_scale
from .merge import masked_softmax_stats

_REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def reference(q, k, v, plan=None, *, causal: bool = True, key_padding_mask=None, scale=None,
              return_lse: bool = False):
    """Attention of q ``[B, Hq, Nq, D]`` over k, v ``[B, Hkv, Nk, D]`` restricted to ``plan``.

    Computed in fp32 (fp64 if given fp64) with K/V repeated to Hq heads. Returns ``out`` (fp32,
    zeros for rows that see no key) or ``(out, lse)`` with lse = -inf for such rows.
    ``causal`` applies only when ``plan`` is None; a plan carries its own causality.
    """
    if plan is not None:
        causal = getattr(plan, "causal", True)
    check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
              dtypes=_REFERENCE_DTYPES)
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if plan is None:
        plan = DensePlan(Nq, Nk, causal)
    plan.validate(q, k)
    mask = plan.to_mask().to(q.device)
    if mask.shape[1] not in (1, Hq):  # per-KV-head plan: shared by the query group
        mask = mask.repeat_interleave(Hq // mask.shape[1], dim=1)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = Hq // Hkv
    qf = q.to(ct)
    kf = k.to(ct).repeat_interleave(g, dim=1)
    vf = v.to(ct).repeat_interleave(g, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * default_scale(q, scale)
    p, lse = masked_softmax_stats(scores, mask)
    out = p @ vf
    return (out, lse) if return_lse else out
