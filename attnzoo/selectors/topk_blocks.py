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
        k_ = min(self.top_k, -(-Nk // b))
        if q.dtype != torch.float64:  # ranking keys straight from the scorer (see ops.pooled.ranking_keys)
            keys = pooled_block_scores(q, k, block_size=b, chunk_size=self.chunk_size,
                                       key_padding_mask=ctx.key_padding_mask, keys=True)
            ok, top_idx = keys.topk(k_, dim=-1)
        else:  # fp64 (exact comparisons against slow references): scores and a stable sort
            score = pooled_block_scores(q, k, block_size=b, chunk_size=self.chunk_size,
                                        key_padding_mask=ctx.key_padding_mask)
            cand = sets.past[None, None]
            if ctx.key_padding_mask is not None:
                cand = cand & self._real_blocks(k, ctx.key_padding_mask)[:, None, None, :]
            s = torch.where(cand, score, -1.0)
            top_idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k_]
            ok = s.gather(-1, top_idx)
        # the own blocks count toward top_k; they lie right of every past block, so appending them
        # after the picked past blocks and sorting once gives ascending indices
        valid = (ok >= 0) & (sets.slot[:k_] < sets.n_pick)
        picked = torch.where(valid, top_idx, _ABSENT)
        idx = torch.cat([picked, sets.own_idx.expand(*picked.shape[:2], -1, -1)], -1).sort(-1).values
        counts = valid.sum(-1, dtype=torch.int32) + sets.n_own
        idx = torch.where(idx == _ABSENT, -1, idx).to(torch.int32)
        return BlockPlan(idx, counts, b, b, Nq, Nk)

    def _real_blocks(self, k, key_padding_mask):
        """Bool ``[B, Nkb]``: key blocks holding at least one real key."""
        nkb = -(-k.shape[2] // self.block_size)
        pad = nkb * self.block_size - k.shape[2]
        return torch.nn.functional.pad(key_padding_mask, (0, pad)).view(-1, nkb, self.block_size).any(-1)


_ABSENT = 1 << 40  # sorts after every block index


@dataclass(frozen=True)
class _BlockSets:
    past: torch.Tensor  # [Nqb, Nkb] bool: complete past blocks (the candidates)
    own_idx: torch.Tensor  # [Nqb, 2] int64: blocks crossing the causal frontier, _ABSENT-padded
    n_own: torch.Tensor  # [Nqb] int32
    n_pick: torch.Tensor  # [Nqb, 1]: past blocks to pick (top_k minus the own blocks)
    slot: torch.Tensor  # [top_k] int64


@functools.lru_cache(maxsize=32)
def _sets(q_len: int, kv_len: int, block: int, top_k: int, device) -> _BlockSets:
    """Everything that depends on shapes only: built once per shape, reused by every layer."""
    past = past_blocks(q_len, kv_len, block, device)
    last = last_visible_block(q_len, kv_len, block, block, device)
    nkb = past.shape[1]
    col = torch.arange(nkb, device=device)
    own = (col[None, :] <= last[:, None]) & ~past
    n_own = own.sum(-1, dtype=torch.int32)
    # own blocks are the last one or two visible columns: last - 1 (if own) and last
    own_at = lambda c: torch.where(own.gather(1, c.clamp(min=0)[:, None])[:, 0] & (c >= 0), c, _ABSENT)  # noqa: E731
    own_idx = torch.stack([own_at(last - 1), own_at(last)], -1)
    assert bool((own.sum(-1) == (own_idx != _ABSENT).sum(-1)).all()), "own blocks beyond the last two columns"
    return _BlockSets(past, own_idx, n_own, (top_k - n_own[:, None]).clamp(min=0), torch.arange(top_k, device=device))
