"""A node with its own decode part: what each generated token reads, apart from the prompt.

``{selector: {name: xattention}, op: block_sparse, decode: {selector: {name: quest, budget: 4096},
op: block_sparse}}`` selects blocks for the prompt with XAttention and pages of the cache with
Quest for every generated token; ``decode: {op: dense}`` says a node attends to the whole cache
while decoding. Without a ``decode`` part a node decides for itself (selectors that keep a plan
over the cache, like streaming, keep it; the others attend densely). Inside a routed node each
branch may carry its own: the router's prefill decision still picks the branch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..context import CallContext
from ..plans import BlockPlan, PrefillRow
from ..selectors.prefill_blocks import CACHE_KEY
from .nodes import Node

__all__ = ["Phased"]


@dataclass
class Phased(Node):
    prefill: Node  # prompts and chunked prefill
    decode: Node  # one new query per sequence against the cache (CallContext.decode)

    def children(self):
        return [self.prefill, self.decode]

    def places_blocks(self, decode: bool) -> bool:
        return (self.decode if decode else self.prefill).places_blocks(decode)

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        reuse = ctx.cache is not None and self._reuses_prefill_plan()
        # kept under this node's own key: two Phased nodes of one layer (routed branches) keep two rows
        key = (CACHE_KEY, id(self))
        if ctx.decode:
            if reuse:  # the decode selector finds the row under its own name
                cache = {**ctx.cache, CACHE_KEY: ctx.cache.get(key)}
                return self.decode(q, k, v, replace(ctx, cache=cache))
            return self.decode(q, k, v, ctx)
        if reuse and q.shape[2] == k.shape[2]:
            cache = ctx.cache
            cache.pop(key, None)  # a prompt that runs dense (no block plan) leaves none: decode reads all
            heads = (q.shape[1], k.shape[1])

            def keep(plan, kpm=ctx.key_padding_mask):
                if isinstance(plan, BlockPlan) and plan.heads in heads and plan.kv_len == k.shape[2]:
                    cache[key] = PrefillRow.of(plan, kpm)
            return self.prefill(q, k, v, replace(ctx, keep_plan=keep))
        return self.prefill(q, k, v, replace(ctx, keep_plan=None) if ctx.keep_plan is not None else ctx)

    def launches_once(self, q, k) -> bool:
        return self.prefill.launches_once(q, k)  # graphs serve prefills only

    def capture_refusal(self, q, k, ctx=None) -> str | None:
        if self._reuses_prefill_plan():
            return "the prompt's plan is kept in ctx.cache for the decode part"
        return self.prefill.capture_refusal(q, k, ctx)

    def _reuses_prefill_plan(self) -> bool:
        sel = getattr(self.decode, "selector", None)
        return bool(getattr(sel, "keeps_prefill_plan", False))

    def to_config(self) -> dict:
        return {**self.prefill.to_config(), "decode": self.decode.to_config()}
