"""Streaming attention: attention sinks plus a local window (Elastic Attention's "SSA" mode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..context import as_context
from ..plans import BlockPlan, streaming_block_mask
from ..plans.geometry import cdiv
from ..registry import register
from .base import check_block, check_positive, check_qk


@register("selector", "streaming")
@dataclass
class Streaming:
    """Each query block sees the first ``sink`` tokens and the ``local`` tokens before its first
    query, block-aligned (whole key blocks, so slightly more than ``local`` may be kept).

    Works for prefill, chunked prefill and decode (Nq = 1: sink + the recent window of the cache).
    The pattern is the same for every head; the plan is one per-KV-head view (no copies).
    """

    # a configuration for short sequences (tests, examples): the selector matrix uses it
    plan_kind: ClassVar[str] = "block"
    decode: ClassVar[str] = "plan"  # keeps its window over the cache while decoding
    small_config: ClassVar[dict] = {"sink": 32, "local": 64, "block_size": 32}

    sink: int = 128
    local: int = 1024
    block_size: int = 64

    def __post_init__(self):
        check_positive("sink", self.sink, allow_zero=True)
        check_positive("local", self.local, allow_zero=True)
        check_block("block_size", self.block_size)

    @torch.no_grad()  # plans are discrete: selection never needs (or builds) a graph
    def __call__(self, q, k, ctx=None) -> BlockPlan:
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        B, Hkv, Nq, Nk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
        keep = streaming_block_mask(Nq, Nk, self.block_size, self.sink, self.local, q.device)
        mask = keep[None, None].expand(B, Hkv, *keep.shape)
        return BlockPlan.from_block_mask(mask, self.block_size, self.block_size, Nq, Nk,
                                         max_blocks=self.max_blocks())

    def max_blocks(self) -> int:
        """Key blocks a query block keeps at most: the sink's, the window's, and the two partial
        blocks at the window's edges (a static bound, so building the plan needs no host sync)."""
        b = self.block_size
        return cdiv(self.sink, b) + cdiv(self.local, b) + 2

    def ranges(self) -> dict:
        """The pattern as ranges (sink, local window, block size) for kernels that take them."""
        return {"sink": self.sink, "local": self.local, "block_size": self.block_size}
