"""Top-k key blocks by mean-pooled keys (NSA's selection branch, MoBA-like; SSA trains with it).

Keys are mean-pooled over non-overlapping blocks of ``block_size``. For each query and each
*complete past* key block (every key of it visible to every query of the query block), the
score is softmax over those blocks of q . k_mean / sqrt(D). Scores are summed over the queries
of a query block and over the query heads of a KV group, so a group shares one selection
(per-KV-head plan, no K/V repeat). The query block's own block(s) — those crossing its causal
frontier — are always kept; the top ``top_k`` blocks are kept in total.

Documented variant: the paper selects per query token; attnzoo selects per query block
(block_q = block_size), the granularity a block-sparse kernel consumes.

``sink`` and ``local`` (tokens, whole blocks; default 0 = the method as published) add the first
blocks and the blocks just before each query block's own to what it keeps, on top of its
``top_k``: sixteen 16-token blocks chosen by pooled score alone can miss the text right before a
query, which ordinary next-token prediction leans on (without them, plain-text KL from full
attention was ~1 nat on the embedded model at 8K-32K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..caches import shape_cache
from ..context import as_context
from ..ops.pooled import forced_blocks, past_blocks, pooled_block_scores
from ..ops.selection import top_n
from ..plans import BlockPlan, last_visible_block
from ..plans.geometry import cdiv
from ..registry import register
from .base import check_block, check_positive, check_qk


@register("selector", "topk_blocks")
@dataclass
class TopKBlocks:
    # a configuration for short sequences (tests, examples): the selector matrix uses it
    plan_kind: ClassVar[str] = "block"
    small_config: ClassVar[dict] = {"block_size": 16, "top_k": 4, "chunk_size": 64}

    block_size: int = 16
    top_k: int = 16
    chunk_size: int = 1024  # query tokens scored at once (a multiple of block_size)
    sink: int = 0  # first tokens every query block keeps, besides its top_k
    local: int = 0  # tokens before each query block's own blocks it keeps, besides its top_k

    def __post_init__(self):
        check_block("block_size", self.block_size)
        check_positive("sink", self.sink, allow_zero=True)
        check_positive("local", self.local, allow_zero=True)
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
        extra = cdiv(self.sink, b) + cdiv(self.local, b)
        sets = _sets(Nq, Nk, b, self.top_k, cdiv(self.sink, b), cdiv(self.local, b), q.device)
        # -1 where a block is not a candidate, FIRST at sink and local candidates (picked first): the
        # Triton scorer writes both in the same launch
        score = pooled_block_scores(q, k, block_size=b, chunk_size=self.chunk_size,
                                    key_padding_mask=ctx.key_padding_mask, masked=True,
                                    sink_blocks=cdiv(self.sink, b), local_blocks=cdiv(self.local, b))
        idx, counts = top_n(score, sets.n_pick, sets.own_lo, sets.last, width=self.top_k + extra)
        return BlockPlan(idx, counts, b, b, Nq, Nk)


@dataclass(frozen=True)
class _BlockSets:
    last: torch.Tensor  # [Nqb]: last visible block
    own_lo: torch.Tensor  # [Nqb]: first block crossing the causal frontier (own blocks: own_lo..last)
    n_pick: torch.Tensor  # [Nqb]: past blocks to pick (top_k minus the own blocks, plus sink and local)
    forced: torch.Tensor | None  # [Nqb, Nkb]: past blocks of the sink and the local window (None: neither)


@shape_cache(32)
def _sets(q_len: int, kv_len: int, block: int, top_k: int, sink_blocks: int, local_blocks: int,
          device) -> _BlockSets:
    """Everything that depends on shapes only: built once per shape, reused by every layer."""
    past = past_blocks(q_len, kv_len, block, device)
    last = last_visible_block(q_len, kv_len, block, block, device)
    own_lo = past.sum(-1)  # past blocks are a prefix of the columns, so the first own one follows them
    n_own = (last - own_lo + 1).clamp(min=0)
    n_pick = (top_k - n_own).clamp(min=0)
    if not sink_blocks and not local_blocks:
        return _BlockSets(last, own_lo, n_pick, None)
    forced = forced_blocks(past, sink_blocks, local_blocks)
    return _BlockSets(last, own_lo, n_pick + forced.sum(-1), forced)
