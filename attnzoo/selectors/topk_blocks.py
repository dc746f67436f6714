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

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..ops.merge import masked_softmax_
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
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        g, b = Hq // Hkv, self.block_size
        nqb, nkb = -(-Nq // b), -(-Nk // b)
        off = Nk - Nq
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        dev = q.device
        kp = F.pad(k.to(dt), (0, 0, 0, nkb * b - Nk)).reshape(B, Hkv, nkb, b, D)
        if ctx.key_padding_mask is not None:
            real = F.pad(ctx.key_padding_mask, (0, nkb * b - Nk)).reshape(B, 1, nkb, b, 1).to(dt)
            kmean = (kp * real).sum(3) / real.sum(3).clamp(min=1)
            block_real = real.view(B, nkb, b).any(-1)  # [B, Nkb]
        else:
            kmean = kp.mean(3)
            block_real = torch.ones(B, nkb, dtype=torch.bool, device=dev)
        qp = F.pad(q.to(dt), (0, 0, 0, nqb * b - Nq))
        q_real = torch.arange(nqb * b, device=dev)[None] < Nq  # [1 or B, Nq padded]
        if ctx.key_padding_mask is not None:
            q_real = q_real & F.pad(ctx.key_padding_mask[:, Nk - Nq:], (0, nqb * b - Nq))
        last = last_visible_block(Nq, Nk, b, b, dev)  # [Nqb]
        first_q = torch.arange(nqb, device=dev) * b + off
        col = torch.arange(nkb, device=dev)
        # complete past blocks: wholly before the block's first query and wholly inside Nk
        past = ((col[None, :] + 1) * b - 1 <= first_q[:, None]) & ((col[None, :] + 1) * b <= Nk)
        own = (col[None, :] <= last[:, None]) & ~past  # blocks crossing the causal frontier
        scale = 1.0 / math.sqrt(D)
        step = self.chunk_size // b
        parts = []
        qp = qp * scale  # on q: far smaller than the score matrix
        for I0 in range(0, nqb, step):
            I1 = min(nqb, I0 + step)
            C = I1 - I0
            ncol = int(last[I1 - 1]) + 1  # blocks right of the chunk's diagonal are never candidates
            qc = qp[:, :, I0 * b: I1 * b].reshape(B, Hkv, g * C * b, D)
            s = (qc @ kmean[:, :, :ncol].transpose(-1, -2)).view(B, Hkv, g, C, b, ncol)
            rows_real = q_real[:, I0 * b: I1 * b].reshape(-1, 1, 1, C, b, 1)  # padded rows vote for nothing
            past_c, own_c, real_c = past[I0:I1, :ncol], own[I0:I1, :ncol], block_real[:, :ncol]
            allowed = past_c[None, None, None, :, None, :] & rows_real
            allowed = allowed & real_c[:, None, None, None, None, :]
            p = masked_softmax_(s, allowed)
            score = p.sum(4).sum(2)  # [B, Hkv, C, ncol]: over the block's queries, then the group's heads
            n_pick = (self.top_k - own_c.sum(-1)).clamp(min=0)  # [C]
            cand = past_c[None, None] & real_c[:, None, None, :]
            ranked = score.masked_fill(~cand, -1.0).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
            pick = cand & (ranked < n_pick[None, None, :, None])
            parts.append(F.pad(pick | own_c[None, None], (0, nkb - ncol)))
        mask = torch.cat(parts, dim=2)
        return BlockPlan.from_block_mask(mask, b, b, Nq, Nk)
