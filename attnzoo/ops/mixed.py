"""Mixed-mode attention: each (batch, head) runs dense, streaming or block-sparse, in one call.

This is how a routed layer (Elastic FA/XA, FA/streaming, XA/streaming) runs as a single kernel
launch instead of one launch per branch. Backends:

- ``triton`` (``attnzoo.ops.kernels``): one launch; streaming heads walk their ranges.
- ``blocked``: portable; expands the plan to index lists and runs the blocked block-sparse path.

``fused_backend`` tells a caller (the stack's Routed node) whether a *single-launch* backend
can take a request; where none can, the caller keeps its per-branch calls.
"""

from __future__ import annotations

from ..plans import MixedPlan
from . import dispatch
from ._checks import check_qkv, default_scale
from .block_sparse import BLOCKED
from .dispatch import Backend, choose, make_request, register_backend

PORTABLE = ("blocked",)


def _blocked(q, k, v, plan: MixedPlan, *, key_padding_mask, scale, return_lse):
    return BLOCKED.fn(q, k, v, plan.to_block_plan(), key_padding_mask=key_padding_mask, scale=scale,
                      return_lse=return_lse)


register_backend(Backend(
    op="mixed", name="blocked", fn=_blocked, devices=("cpu", "cuda"),
    dtypes=BLOCKED.dtypes, plan_kinds=("mixed",), backward=True, lse=True,
    description="portable: the plan as index lists through the blocked block-sparse path"))


def _request(q, k, v, plan: MixedPlan, key_padding_mask, return_lse):
    return make_request("mixed", q, k, v, "mixed", return_lse=return_lse,
                        key_padding_mask=key_padding_mask, causal=plan.causal, plan_heads=plan.heads,
                        block_size=(plan.block_size, plan.block_size))


def fused_backend(q, k, v, plan_heads: int, block_size: int, *, key_padding_mask=None,
                  causal: bool = True) -> Backend | None:
    """The single-launch backend that would serve such a call, or None (callers split it)."""
    req = make_request("mixed", q, k, v, "mixed", return_lse=False, key_padding_mask=key_padding_mask,
                       causal=causal, plan_heads=plan_heads, block_size=(block_size, block_size))
    forced = dispatch.forced_backend("mixed", None)
    for b in dispatch.backends("mixed"):
        if b.name in PORTABLE or (forced is not None and b.name != forced):
            continue
        if b.why_not(req, forced=forced is not None) is None:
            return b
    return None


def mixed(q, k, v, plan: MixedPlan, *, key_padding_mask=None, scale=None, return_lse: bool = False,
          backend: str | None = None):
    """Attention of q ``[B, Hq, Nq, D]`` over k/v ``[B, Hkv, Nk, D]``, each head under its mode
    in ``plan``. Returns ``out`` or ``(out, lse)`` like the other ops."""
    if not isinstance(plan, MixedPlan):
        raise TypeError(f"plan must be a MixedPlan, got {type(plan).__name__}")
    check_qkv(q, k, v, causal=plan.causal, key_padding_mask=key_padding_mask, scale=scale)
    plan.validate(q, k)
    impl = choose(_request(q, k, v, plan, key_padding_mask, return_lse), backend)
    out, lse = impl.fn(q, k, v, plan, key_padding_mask=key_padding_mask, scale=default_scale(q, scale),
                       return_lse=return_lse)
    return (out, lse) if return_lse else out
