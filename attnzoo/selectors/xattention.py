"""XAttention (arXiv 2503.16428): block selection by strided antidiagonal scoring.

Scoring, stride S, block b (tokens), per query head:
  Q~[i] = concat_t Q[iS + S-1-t],  K~[j] = concat_t K[jS + t]   (t = 0..S-1)
  so Q~ K~^T [i, j] is the antidiagonal sum of the S x S tile (i, j) of Q K^T, at 1/S the cost;
  P = row-softmax(Q~ K~^T / (sqrt(D) S)) with the causal rule in reduced index space;
  W[I, J] = sum of P over the (b/S) x (b/S) sub-grid of query block I and key block J.
Selection, per (head, query block), threshold tau: keep the sink block and the diagonal block,
then add the other causal blocks in descending W while the mass *before* adding one is below
tau x (row mass of W). tau = 1 keeps every causal block.

Better than the authors' code: any batch size and padding (right padding here; the stack rolls
left-padded sequences to start at row 0, see ``attnzoo.stack.padding``); GQA is scored without repeating K
(the query group is folded into rows against its KV head); queries are scored in chunks, so
memory never holds the (N/S) x (N/S) matrix; ``per_kv_head=True`` merges a group's selections
into one per-KV-head plan (what FlashInfer's variable block-sparse kernel consumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..caches import shape_cache
from ..context import as_context
from ..ops.antidiagonal import antidiagonal_block_scores
from ..ops.selection import by_mass, keep_rows
from ..plans import BlockPlan, last_visible_block, tail_query_blocks
from ..registry import register
from .base import check_block, check_fraction, check_positive, check_qk


@register("selector", "xattention")
@dataclass
class XAttention:
    # a configuration for short sequences (tests, examples): the selector matrix uses it
    plan_kind: ClassVar[str] = "block"
    small_config: ClassVar[dict] = {"block_size": 32, "stride": 4, "chunk_size": 64}

    threshold: float | list[float] = 0.9  # scalar, or one value per query head
    stride: int = 8
    block_size: int = 128
    chunk_size: int = 2048  # query tokens scored at once (a multiple of block_size)
    per_kv_head: bool = False
    keep_sink: bool = True
    keep_diagonal: bool = True
    dense_tail: int = 0  # last query tokens of each sequence that keep every block (module docstring)

    def __post_init__(self):
        check_fraction("threshold", self.threshold)
        if isinstance(self.dense_tail, bool) or not isinstance(self.dense_tail, int):
            raise TypeError(f"dense_tail must be an int (tokens), got {self.dense_tail!r}")
        check_positive("dense_tail", self.dense_tail, allow_zero=True)
        check_block("block_size", self.block_size)
        check_positive("stride", self.stride)
        if self.block_size % self.stride:
            raise ValueError(f"stride ({self.stride}) must divide block_size ({self.block_size})")
        check_positive("chunk_size", self.chunk_size)
        if self.chunk_size % self.block_size:
            raise ValueError(f"chunk_size ({self.chunk_size}) must be a multiple of block_size "
                             f"({self.block_size})")

    # -- scoring -----------------------------------------------------------------------------
    def block_scores(self, q, k, ctx=None):
        """Yield ``(I0, I1, W)`` per query chunk: W ``[B, Hq, I1-I0, Nkb]`` block scores (fp32,
        fp64 for fp64 inputs), from the ``antidiagonal_scores`` op (torch or Triton backend)."""
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        return antidiagonal_block_scores(q, k, stride=self.stride, block_size=self.block_size,
                                         chunk_size=self.chunk_size,
                                         key_padding_mask=ctx.key_padding_mask, active_heads=ctx.active_heads)

    # -- selection ---------------------------------------------------------------------------
    def _tau(self, Hq: int, device, dtype) -> torch.Tensor:
        tau = torch.as_tensor(self.threshold, dtype=dtype, device=device)
        if tau.ndim == 0:
            return tau.expand(Hq)
        if tau.numel() != Hq:
            raise ValueError(f"threshold has {tau.numel()} per-head values; q has {Hq} heads")
        return tau

    @torch.no_grad()  # plans are discrete: selection never needs (or builds) a graph
    def __call__(self, q, k, ctx=None) -> BlockPlan:
        ctx = as_context(ctx)
        check_qk(q, k, ctx)  # before unpacking shapes: a bad rank gets a message naming q or k
        B, Hq, Nq, _ = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        b = self.block_size
        parts = list(self.block_scores(q, k, ctx))  # one chunk on a GPU (see the Triton scorer)
        w = parts[0][2] if len(parts) == 1 else torch.cat([w for _, _, w in parts], dim=2)
        plan = self._plan(w, Nq, Nk, ctx.key_padding_mask)
        if self.per_kv_head:  # the union of a group's selections, through the block mask
            mask = plan.to_block_mask()
            mask = mask.view(B, Hkv, Hq // Hkv, *mask.shape[2:]).any(2)
            return BlockPlan.from_block_mask(mask, b, b, Nq, Nk)
        return plan

    def _plan(self, w: torch.Tensor, Nq: int, Nk: int, key_padding_mask=None) -> BlockPlan:
        """What ``select`` chooses, written straight into index lists by the ``block_select`` op
        (every query block at once, no block mask, no host sync; one launch on a GPU)."""
        tau, keep_all = self._target(w.shape[1], w.device, w.dtype)
        last = _last(Nq, Nk, self.block_size, w.device)
        idx, counts = by_mass(w, tau, keep_all, last, keep_sink=self.keep_sink, keep_diagonal=self.keep_diagonal)
        if self.dense_tail:
            if key_padding_mask is None:  # shapes only: built once per shape (no launches per call)
                rows = _tail(Nq, Nk, self.block_size, self.dense_tail, w.device)
            else:
                rows = tail_query_blocks(Nq, Nk, self.block_size, self.dense_tail, key_padding_mask, w.device)
            idx, counts = keep_rows(idx, counts, rows, last)
        return BlockPlan(idx, counts, self.block_size, self.block_size, Nq, Nk)

    def _target(self, Hq: int, device, dtype):
        """``[1, H, 1, 1]`` thresholds and where tau >= 1 (keep every block), cached per device."""
        key = (Hq, str(device), dtype)
        cache = self.__dict__.setdefault("_targets", {})
        if key not in cache:
            tau = self._tau(Hq, device, dtype).view(1, Hq, 1, 1)
            cache[key] = (tau, tau >= 1)
        return cache[key]


@shape_cache(32)
def _tail(q_len: int, kv_len: int, block: int, tail: int, device) -> torch.Tensor:
    """The query blocks holding the last ``tail`` queries, without padding; built once per shape."""
    return tail_query_blocks(q_len, kv_len, block, tail, None, device)


@shape_cache(32)
def _last(q_len: int, kv_len: int, block: int, device) -> torch.Tensor:
    """Last visible key block per query block; shapes only, built once per shape."""
    return last_visible_block(q_len, kv_len, block, block, device)
