"""A node with its own decode part: what each generated token reads, apart from the prompt.

``{selector: {name: xattention}, op: block_sparse, decode: {selector: {name: quest, budget: 4096},
op: block_sparse}}`` selects blocks for the prompt with XAttention and pages of the cache with
Quest for every generated token; ``decode: {op: dense}`` says a node attends to the whole cache
while decoding. Without a ``decode`` part a node decides for itself (selectors that keep a plan
over the cache, like streaming, keep it; the others attend densely). Inside a routed node each
branch may carry its own: the router's prefill decision still picks the branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import CallContext
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
        return (self.decode if ctx.decode else self.prefill)(q, k, v, ctx)

    def to_config(self) -> dict:
        return {**self.prefill.to_config(), "decode": self.decode.to_config()}
