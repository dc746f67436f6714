"""Token Sparse Attention (arXiv 2602.03216): per-head kept tokens by dynamic token coverage.

Per layer, window W, prefix P = N - W:
1. importance a_h(j) = mean over the last W queries of softmax(q . k_j / sqrt(D)) (softmax over
   all keys, future keys inside the window masked) — only W rows are scored, never N x N;
2. smoothed along keys by average pooling (kernel 7, stride 1, padding 3);
3. s_h = a~_h / sum a~_h; g = mean over heads of a~_h, normalised the same way;
4. coverage tau: sort g ascending; n = tokens whose cumulative sum stays below tau; n = 0 means
   nothing can be dropped (dense); else n + 1 and K = max(min_tokens, P - n);
5. each head keeps its top-K prefix tokens by s_h plus the last W tokens, sorted.
A layer runs dense (``DensePlan``) when N <= min_tokens + W or for decode (Nq < Nk: the cache
holds uncompressed K/V); a sequence with nothing to drop keeps all its tokens (on a CPU a layer
where no sequence drops anything returns ``DensePlan``; on a GPU that would be a host read).

Batch > 1 and padding: each sequence is decided on its own real tokens (padding is never kept),
all at once on the device: real tokens are moved to the front by a stable sort, every step is
masked by the sequence's length, and no value is read on the host (tests/test_selectors.py checks
the batch against the slow per-sequence reference under every padding, and that nothing is read).
Building the ``TokenPlan`` reads its width (the most tokens a head keeps): one read per layer,
unless ``max_keep`` bounds it or the caller asks for static shapes (``ctx.static_shapes``, set by a
compressed node whose inner attention skips each head's padded rows on the device: the width is
then N, nothing is read, and the prefill can be captured in a CUDA graph); the width read is
rounded up (``plans.token.bucket_width``), so the attention over the kept tokens sees a few shapes
per length rather than a new one in every call.
``max_keep`` (not in the paper) caps each head's kept prefix tokens at ``max(min_tokens,
ceil(max_keep * P))``, even where the coverage would keep more or run dense; the plan's width is
then a function of N alone: no host read, one shape per length (the hot path on a GPU can be
captured), at the price of attention over the cap even where the coverage keeps fewer
(tail slots hold copies of token 0 and sit after every real row).
``per_kv_head=True`` scores a GQA group together (mean of s_h over the group), so compression
gathers K/V at Hkv heads instead of Hq.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..context import as_context
from ..plans import DensePlan, TokenPlan
from ..plans.token import bucket_width
from ..registry import register
from .base import check_fraction, check_positive, check_qk


@register("selector", "token_coverage")
@dataclass
class TokenCoverage:
    # a configuration for short sequences (tests, examples): the selector matrix uses it
    plan_kind: ClassVar[str] = "token"
    sizes_statically: ClassVar[bool] = True  # honours ctx.static_shapes: the plan's width is then N
    small_config: ClassVar[dict] = {"coverage": 0.05, "window": 32, "min_tokens": 64}

    coverage: float = 0.005
    window: int = 128
    min_tokens: int = 1024
    pool_kernel: int = 7
    per_kv_head: bool = False
    max_keep: float | None = None  # most prefix tokens a head keeps, as a share of the prefix (>= min_tokens)

    def __post_init__(self):
        check_fraction("coverage", self.coverage)
        check_positive("window", self.window)
        check_positive("min_tokens", self.min_tokens, allow_zero=True)
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd integer, got {self.pool_kernel}")
        if self.max_keep is not None:
            if isinstance(self.max_keep, bool) or not isinstance(self.max_keep, (int, float)):
                raise TypeError(f"max_keep must be a float in (0, 1] or None, got {type(self.max_keep).__name__}")
            check_fraction("max_keep", self.max_keep)

    def cap(self, prefix: int) -> int | None:
        """The most prefix tokens a head keeps of ``prefix`` (None: no cap)."""
        if self.max_keep is None:
            return None
        return max(self.min_tokens, math.ceil(self.max_keep * prefix))  # float64, as on the device

    def width(self, n: int) -> int | None:
        """The plan's static width for ``n`` keys where ``max_keep`` bounds it below ``n`` (None: read)."""
        cap = self.cap(n - self.window)
        return None if cap is None or cap + self.window >= n else cap + self.window

    def importance(self, q, k, lengths=None):
        """``[B, Hq, N]`` mean attention of each sequence's last W queries on every key (fp32/fp64).
        ``lengths`` ``[B]``: sequence b's real tokens are its first ``lengths[b]`` (None: all N);
        its window is the W queries before ``lengths[b]``, which see no key after themselves."""
        B, Hq, N, D = q.shape
        Hkv, g, W = k.shape[1], Hq // k.shape[1], min(self.window, N)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        end = torch.full((B,), N, device=q.device) if lengths is None else lengths
        rows = (end[:, None] - W + torch.arange(W, device=q.device)).clamp(min=0)  # [B, W]
        qw = q.gather(2, rows[:, None, :, None].expand(B, Hq, W, D)).to(dt).reshape(B, Hkv, g * W, D)
        s = (qw @ k.to(dt).transpose(-1, -2)).view(B, Hq, W, N) / math.sqrt(D)  # GQA: group folded into rows
        future = torch.arange(N, device=q.device)[None, None, :] > rows[:, :, None]  # [B, W, N]
        return torch.softmax(s.masked_fill(future[:, None], float("-inf")), -1).mean(2)

    def _smooth(self, a):
        B, H, N = a.shape
        k = self.pool_kernel
        return F.avg_pool1d(a.reshape(B * H, 1, N), k, stride=1, padding=k // 2).view(B, H, N)

    def keep_mask(self, a, lengths):
        """Bool ``[B, H, N]``: the tokens each head keeps, from importance ``a`` ``[B, H, N]`` of
        sequences whose first ``lengths[b]`` tokens are real. Every sequence is decided on its own
        tokens, on the device (no host read): a sequence with nothing to drop keeps all its tokens."""
        B, H, N = a.shape
        W, dev = self.window, a.device
        pos = torch.arange(N, device=dev)
        real = pos[None] < lengths[:, None]  # [B, N]
        P = lengths - W  # prefix before the window
        prefix = pos[None] < P[:, None]
        # smoothed over the sequence's own tokens (padding holds no mass: the pool's zero padding)
        sm = self._smooth(a).masked_fill(~prefix[:, None], 0.0)
        s = sm / sm.sum(-1, keepdim=True).clamp_min(1e-30)
        gl = sm.mean(1)
        gl = gl / gl.sum(-1, keepdim=True).clamp_min(1e-30)
        cum = gl.masked_fill(~prefix, float("inf")).sort(-1).values.cumsum(-1)
        drop = (cum < self.coverage).sum(-1)  # [B]
        keep_k = torch.clamp(P - (drop + 1), min=self.min_tokens)
        dense = (lengths <= self.min_tokens + W) | (drop == 0) | (keep_k >= P)
        order = s.masked_fill(~prefix[:, None], float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
        if self.max_keep is not None:  # the cap holds where the coverage keeps more, dense included
            cap = torch.ceil(P.double() * self.max_keep).long().clamp(min=self.min_tokens)
            keep_k = torch.where(dense, P, keep_k).minimum(cap)
            return (rank < keep_k[:, None, None]) & prefix[:, None] | (real & ~prefix)[:, None]
        keep = (rank < keep_k[:, None, None]) & prefix[:, None] | (real & ~prefix)[:, None]
        return torch.where(dense[:, None, None], real[:, None], keep)

    @torch.no_grad()  # plans are discrete: selection never needs (or builds) a graph
    def __call__(self, q, k, ctx=None):
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        B, Hq, Nq, _ = q.shape
        Nk = k.shape[2]
        if Nq != Nk or Nk <= self.min_tokens + self.window:
            return DensePlan(Nq, Nk)
        kpm, Hkv = ctx.key_padding_mask, k.shape[1]
        if kpm is None:
            lengths, order = torch.full((B,), Nk, device=q.device), None
        else:  # each sequence's real tokens moved to its front, in order (a stable sort: no host read)
            order = (~kpm).to(torch.uint8).argsort(dim=-1, stable=True)
            lengths = kpm.sum(-1)
            q, k = (t.gather(2, order[:, None, :, None].expand_as(t)) for t in (q, k))
        a = self.importance(q, k, lengths)
        if self.per_kv_head:
            a = a.view(B, Hkv, Hq // Hkv, Nk).mean(2)
        keep = self.keep_mask(a, lengths)
        if order is not None:
            keep = torch.zeros_like(keep).scatter_(-1, order[:, None].expand_as(keep), keep)
        width = self.width(Nk)
        if width is None and ctx.static_shapes:  # the caller's attention skips each head's unused slots
            width = Nk
        # on a CPU reading the counts costs nothing: a layer that drops nothing runs as dense
        if width is None and not keep.is_cuda and not bool((keep.sum(-1) < lengths[:, None]).any()):
            return DensePlan(Nq, Nk)
        if width is None:  # one host read: the longest head's count and the longest real sequence
            kmax, real = torch.stack([keep.sum(-1).max(), lengths.max()]).tolist()
            width = bucket_width(max(int(kmax), 1), int(real))
        return TokenPlan.from_keep_mask(keep, width)
