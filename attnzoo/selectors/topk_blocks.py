"""Top-k key blocks by mean-pooled keys (NSA's selection branch, MoBA-like; SSA trains with it).

Keys are mean-pooled over non-overlapping blocks of ``block_size``. For each query and each
*complete past* key block (every key of it visible to every query of the query block), the
score is softmax over those blocks of q . k_mean / sqrt(D). Scores are summed over the queries
of a query block and over the query heads of a KV group, so a group shares one selection
(per-KV-head plan, no K/V repeat). The query block's own block(s) — those crossing its causal
frontier — are always kept; the top ``top_k`` blocks are kept in total.

Documented variant: the paper selects per query token; attnzoo selects per query block
(block_q = block_size), the granularity a block-sparse kernel consumes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ops.pooled import past_blocks, pooled_block_scores
from ..ops.selection import top_n
from ..plans import BlockPlan, last_visible_block
from ..registry import register
from .base import as_context, check_block, check_positive, check_qk


@register("selector", "topk_blocks")
@dataclass
class TopKBlocks:
    # a configuration for short sequences (tests, examples): the selector matrix uses it
    plan_kind: ClassVar[str] = "block"
    small_config: ClassVar[dict] = {"block_size": 16, "top_k": 4, "chunk_size": 64}

    block_size: int = 16
    top_k: int = 16
    chunk_size: int = 1024  # query tokens scored at once (a multiple of block_size)

    def __post_init__(self):
        check_block("block_size", self.block_size)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        check_positive("chunk_size", self.chunk_size)
        if self.chunk_size % self.block_size:
            raise ValueError(f"chunk_size ({self.chunk_size}) must be a multiple of block_size "
                             f"({self.block_size})")

    @torch.no_grad()  # plans are discrete: selection never needs (or builds) a graph
    def __call__(self, q, k, ctx=None) -> BlockPlan:
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        Nq, Nk, b = q.shape[2], k.shape[2], self.block_size
        sets = _sets(Nq, Nk, b, self.top_k, q.device)
        # -1 where a block is not a candidate (the Triton scorer writes it in the same launch)
        score = pooled_block_scores(q, k, block_size=b, chunk_size=self.chunk_size,
                                    key_padding_mask=ctx.key_padding_mask, masked=True)
        idx, counts = top_n(score, sets.n_pick, sets.own_lo, sets.last, width=self.top_k)
        return BlockPlan(idx, counts, b, b, Nq, Nk)


@dataclass(frozen=True)
class _BlockSets:
    last: torch.Tensor  # [Nqb]: last visible block
    own_lo: torch.Tensor  # [Nqb]: first block crossing the causal frontier (own blocks: own_lo..last)
    n_pick: torch.Tensor  # [Nqb]: past blocks to pick (top_k minus the own blocks)


@functools.lru_cache(maxsize=32)
def _sets(q_len: int, kv_len: int, block: int, top_k: int, device) -> _BlockSets:
    """Everything that depends on shapes only: built once per shape, reused by every layer."""
    past = past_blocks(q_len, kv_len, block, device)
    last = last_visible_block(q_len, kv_len, block, block, device)
    own_lo = past.sum(-1)  # past blocks are a prefix of the columns, so the first own one follows them
    n_own = (last - own_lo + 1).clamp(min=0)
    return _BlockSets(last, own_lo, (top_k - n_own).clamp(min=0))
