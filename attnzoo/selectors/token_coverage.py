"""Token Sparse Attention (arXiv 2602.03216): per-head kept tokens by dynamic token coverage.

Per layer, window W, prefix P = N - W:
1. importance a_h(j) = mean over the last W queries of softmax(q . k_j / sqrt(D)) (softmax over
   all keys, future keys inside the window masked) — only W rows are scored, never N x N;
2. smoothed along keys by average pooling (kernel 7, stride 1, padding 3);
3. s_h = a~_h / sum a~_h; g = mean over heads of a~_h, normalised the same way;
4. coverage tau: sort g ascending; n = tokens whose cumulative sum stays below tau; n = 0 means
   nothing can be dropped (dense); else n + 1 and K = max(min_tokens, P - n);
5. each head keeps its top-K prefix tokens by s_h plus the last W tokens, sorted.
A layer runs dense (``DensePlan``) when N <= min_tokens + W, when nothing can be dropped, or for
decode (Nq < Nk: the cache holds uncompressed K/V).

Batch > 1 and padding: each sequence is decided on its own real tokens (padding is never kept).
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
from ..registry import register
from .base import check_fraction, check_positive, check_qk


@register("selector", "token_coverage")
@dataclass
class TokenCoverage:
    # a configuration for short sequences (tests, examples): the selector matrix uses it
    plan_kind: ClassVar[str] = "token"
    small_config: ClassVar[dict] = {"coverage": 0.05, "window": 32, "min_tokens": 64}

    coverage: float = 0.005
    window: int = 128
    min_tokens: int = 1024
    pool_kernel: int = 7
    per_kv_head: bool = False

    def __post_init__(self):
        check_fraction("coverage", self.coverage)
        check_positive("window", self.window)
        check_positive("min_tokens", self.min_tokens, allow_zero=True)
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd integer, got {self.pool_kernel}")

    def importance(self, q, k):
        """``[B, Hq, N]`` mean attention of the last W queries on every key (fp32/fp64)."""
        B, Hq, N, D = q.shape
        Hkv, g, W = k.shape[1], Hq // k.shape[1], min(self.window, N)
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qw = q[:, :, N - W:].to(dt).reshape(B, Hkv, g * W, D)  # GQA: group folded into rows
        s = (qw @ k.to(dt).transpose(-1, -2)).view(B, Hq, W, N) / math.sqrt(D)
        future = torch.arange(N, device=q.device)[None, :] > torch.arange(N - W, N, device=q.device)[:, None]
        return torch.softmax(s.masked_fill(future, float("-inf")), -1).mean(2)

    def _smooth(self, a):
        B, H, N = a.shape
        k = self.pool_kernel
        return F.avg_pool1d(a.reshape(B * H, 1, N), k, stride=1, padding=k // 2).view(B, H, N)

    def _keep_one(self, a):
        """Keep mask ``[H, n]`` for one sequence (``a``: importance [H, n]), or None (dense)."""
        H, n = a.shape
        W = self.window
        if n <= self.min_tokens + W:
            return None
        P = n - W
        sm = self._smooth(a[None])[0][:, :P]
        s = sm / sm.sum(-1, keepdim=True).clamp_min(1e-30)
        gl = sm.mean(0)
        gl = gl / gl.sum().clamp_min(1e-30)
        cum = gl.sort().values.cumsum(0)
        drop = int((cum < self.coverage).sum())
        if drop == 0:
            return None
        keep_k = max(self.min_tokens, P - (drop + 1))
        if keep_k >= P:
            return None
        top = s.topk(keep_k, dim=-1).indices
        keep = torch.zeros(H, n, dtype=torch.bool, device=a.device)
        keep.scatter_(1, top, True)
        keep[:, P:] = True
        return keep

    @torch.no_grad()  # plans are discrete: selection never needs (or builds) a graph
    def __call__(self, q, k, ctx=None):
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        B, Hq, Nq, _ = q.shape
        Nk = k.shape[2]
        if Nq != Nk or Nk <= self.min_tokens + self.window:
            return DensePlan(Nq, Nk)
        kpm = ctx.key_padding_mask
        Hkv = k.shape[1]
        Hp = Hkv if self.per_kv_head else Hq
        keep = torch.zeros(B, Hp, Nk, dtype=torch.bool, device=q.device)
        any_sparse = False
        for b in range(B):  # each sequence is decided on its own real tokens
            real = kpm[b].nonzero().squeeze(-1) if kpm is not None else torch.arange(Nk, device=q.device)
            a = self.importance(q[b:b + 1, :, real], k[b:b + 1, :, real])[0]
            if self.per_kv_head:
                a = a.view(Hkv, Hq // Hkv, -1).mean(1)
            kb = self._keep_one(a)
            keep[b][:, real] = True if kb is None else kb
            any_sparse |= kb is not None
        if not any_sparse:
            return DensePlan(Nq, Nk)
        return TokenPlan.from_keep_mask(keep)
