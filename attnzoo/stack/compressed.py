"""A Compressed node: Token Sparse's gather, an inner node on the kept tokens, the scatter back."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..context import CallContext, deferred_value
from ..ops import dense as dense_op
from ..ops import token_sparse
from ..plans import DensePlan, TokenPlan
from ..registry import to_config
from .nodes import Node, dense_below_applies, density_of


@dataclass
class Compressed(Node):
    compress: object
    inner: Node
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which attention runs dense

    def children(self):
        return [self.inner]

    def places_blocks(self, decode: bool) -> bool:
        return not decode or super().places_blocks(decode)

    def _static_width(self, q, k) -> bool:
        """Whether the plan's width can be the input's length, read from nothing: the selector sizes
        plans on request (``ctx.static_shapes``) and the inner attention skips each head's padded
        rows on the device, so the slots past a head's kept tokens cost no attention."""
        return getattr(self.compress, "sizes_statically", False) and self.inner.skips_rows(q, k)

    def launches_once(self, q, k) -> bool:
        return dense_below_applies(self.dense_below, k)

    def capture_refusal(self, q, k, ctx=None) -> str | None:
        if dense_below_applies(self.dense_below, k):
            return None
        width = getattr(self.compress, "width", None)
        if (width is None or width(k.shape[2]) is None) and not self._static_width(q, k):
            return ("the compressed width is read on the host (token_coverage's max_keep, or an inner dense "
                    "op that skips padded rows, makes it static)")
        return self.inner.capture_refusal(q, k, ctx)

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if dense_below_applies(self.dense_below, k):
            ctx.record(1.0)
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        if ctx.decode:
            return self.inner(q, k, v, ctx)  # the cache holds uncompressed K/V
        B = q.shape[0]
        if B > 1 and self.inner.places_blocks(False):
            # a batch pads every head's kept tokens to the batch's longest (tail slots hold copies of
            # token 0), so an inner selector placing blocks would score a sequence differently beside
            # other prompts than alone: one sequence at a time keeps batched == alone
            kpm, keys = ctx.key_padding_mask, ctx.pre_rope_keys
            return torch.cat([self(q[b:b + 1], k[b:b + 1], v[b:b + 1], replace(
                ctx, key_padding_mask=None if kpm is None else kpm[b:b + 1], share=ctx.share / B,
                pre_rope_keys=None if keys is None else keys[b:b + 1])) for b in range(B)])
        static = self._static_width(q, k)
        with torch.no_grad():
            plan = self.compress(q, k, replace(ctx, static_shapes=True) if static else ctx)
        if isinstance(plan, DensePlan):
            return self.inner(q, k, v, ctx)
        if not isinstance(plan, TokenPlan):
            raise TypeError(f"compress selector returned {type(plan).__name__}, expected a TokenPlan")
        qc, kc, vc = token_sparse.compress(q, k, v, plan, key_padding_mask=ctx.key_padding_mask)
        # kept tokens are real tokens; shorter heads' tail slots sit after every real row (causal)
        outer = ctx.density_scale
        inner = replace(ctx, key_padding_mask=None, pre_rope_keys=None, keep_plan=None,  # the scale is read lazily
                        density_scale=lambda: deferred_value(outer) * density_of(plan), static_shapes=False,
                        row_lengths=plan.lengths if static else None)  # a read width: cuDNN's over it
        oc = self.inner(qc, kc, vc, inner)
        return token_sparse.decompress(oc, plan, q.shape[2])

    def to_config(self) -> dict:
        out = {"compress": to_config(self.compress), "inner": self.inner.to_config()}
        if self.dense_below:
            out["dense_below"] = dict(self.dense_below)
        return out
