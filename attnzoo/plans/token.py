"""Token plans: the kept positions of Token Sparse Attention (``TokenPlan``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import value_checks
from .geometry import causal_mask, check_index_tensor, check_int, check_qk_heads


def bucket_width(n: int, limit: int) -> int:
    """``n`` rounded up to a multiple of ``max(64, 2**(floor(log2 n) - 3))``, at most ``limit``:
    at most 12.5 % more slots, about eight widths per doubling.

    Why: a compressed width that differs in every layer and prompt is a new shape for the kernel
    that attends over it, and PyTorch's default SDPA on Hopper (cuDNN) builds an execution plan per
    new shape -- tens to hundreds of ms each. On an H100, `token-sparse` took 595 ms per 8K prefill
    in `attnzoo compare` (72 distinct prompts) against full's 22 ms, while `token-sparse-xattention`,
    whose inner attention is a Triton kernel with no per-shape plan, took 71 ms
    (bench/results/2026-12-07-h100-fidelity-per-length). Extra slots are tail copies of token 0 after
    every real row: causal attention never lets a real row see them, and decompress drops them.
    ``limit`` should not depend on padding (the longest sequence's real tokens, not the padded
    length): an inner selector scoring blocks sees the tail slots beside the last real rows, so a
    sequence padded in a batch must get the width it gets alone."""
    step = max(64, 1 << max(0, n.bit_length() - 4))
    return min(limit, -(-n // step) * step)


@dataclass(frozen=True, repr=False, eq=False)
class TokenPlan:
    """Per-head kept token positions (Token Sparse Attention's compress/decompress).

    ``indices[b, h, :lengths[b, h]]`` are kept positions, strictly ascending; slots beyond
    ``lengths`` are ignored. ``h`` runs over Hq or Hkv (shared by the query group). Kept
    queries attend causally to kept keys; dropped queries produce zeros. Self-attention only
    (Nq == Nk == ``seq_len``): this is a prefill-time plan.
    """

    indices: torch.Tensor  # [B, H, N'] int64
    lengths: torch.Tensor  # [B, H]
    seq_len: int

    kind = "token"

    def __post_init__(self):
        check_int("seq_len", self.seq_len)
        check_index_tensor("indices", self.indices, 3)
        check_index_tensor("lengths", self.lengths, 2)
        if self.lengths.shape != self.indices.shape[:2]:
            raise ValueError(
                f"lengths shape {tuple(self.lengths.shape)} must equal indices.shape[:2] "
                f"= {tuple(self.indices.shape[:2])}"
            )

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def heads(self) -> int:
        return self.indices.shape[1]

    @property
    def max_len(self) -> int:
        return self.indices.shape[2]

    @classmethod
    def from_keep_mask(cls, keep: torch.Tensor, width: int | None = None) -> TokenPlan:
        """From a bool ``[B, H, N]`` keep mask. ``width``: the plan's ``max_len`` when the caller
        knows a bound on the kept count (a selector with a static cap, or ``bucket_width`` of the
        count it read): nothing is read on the host. Without it the longest head's count is read."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 3:
            raise TypeError("keep must be a bool tensor [B, H, N]")
        lengths = keep.sum(-1)
        if width is None:
            kmax = max(int(lengths.max()) if lengths.numel() else 0, 1)
        else:
            check_int("width", width)
            if not 1 <= width <= keep.shape[-1]:
                raise ValueError(f"width must lie in [1, {keep.shape[-1]}] (keep.shape[-1]), got {width}")
            if value_checks(keep.device) and lengths.numel() and int(lengths.max()) > width:
                raise ValueError(f"a head keeps {int(lengths.max())} tokens, more than width={width}")
            kmax = width
        # each kept position's slot is the count of kept positions before it (a scan, not a sort);
        # the rest land in a spare column that is dropped, and unused slots hold -1
        slot = keep.cumsum(-1) - 1
        col = torch.where(keep & (slot < kmax), slot, kmax)
        pos = torch.arange(keep.shape[-1], device=keep.device).expand_as(keep)
        idx = torch.full((*keep.shape[:2], kmax + 1), -1, dtype=torch.long, device=keep.device)
        return cls(idx.scatter_(-1, col, pos)[..., :kmax], lengths, keep.shape[-1])

    def valid(self) -> torch.Tensor:
        """Bool ``[B, H, N']``: which slots hold a kept position."""
        return torch.arange(self.max_len, device=self.indices.device) < self.lengths[..., None]

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.shape[2] != self.seq_len or k.shape[2] != self.seq_len:
            raise ValueError(
                f"TokenPlan is for self-attention over seq_len={self.seq_len}; got q with "
                f"{q.shape[2]} and k with {k.shape[2]} positions"
            )
        if self.batch != q.shape[0]:
            raise ValueError(f"plan has batch {self.batch}, q has batch {q.shape[0]}")
        check_qk_heads(q, k, self.heads, "TokenPlan (indices)")
        if self.indices.device != q.device:
            raise ValueError(f"plan is on {self.indices.device}, q is on {q.device}")
        if value_checks(q.device):
            self.check_indices()

    def check_indices(self) -> None:
        """Content checks: lengths in range, kept positions in range and strictly ascending."""
        if self.lengths.device != self.indices.device:
            raise ValueError("lengths and indices must be on the same device")
        idx, n = self.indices.long(), self.lengths.long()
        if ((n < 0) | (n > self.max_len)).any():
            raise ValueError(f"lengths must lie in [0, {self.max_len}] (indices.shape[-1])")
        valid = self.valid()
        if (valid & ((idx < 0) | (idx >= self.seq_len))).any():
            raise ValueError(f"indices out of range [0, {self.seq_len})")
        if (valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any():
            raise ValueError("indices must be strictly ascending within each head")

    def keep_mask(self) -> torch.Tensor:
        """Bool ``[B, H, N]``: kept positions."""
        out = torch.zeros(self.batch, self.heads, self.seq_len + 1, dtype=torch.bool,
                          device=self.indices.device)
        col = torch.where(self.valid(), self.indices.long(), self.seq_len)
        out.scatter_(-1, col, True)
        return out[..., : self.seq_len]

    def to_mask(self) -> torch.Tensor:
        """Dense bool ``[B, H, N, N]``: kept query x kept key x causal. Tests / small N only."""
        keep = self.keep_mask()
        return keep[..., :, None] & keep[..., None, :] & causal_mask(
            self.seq_len, self.seq_len, device=keep.device)

    def density(self, reduce: bool = True):
        n = self.lengths.double()
        d = n * (n + 1) / (self.seq_len * (self.seq_len + 1))
        return float(d.mean()) if reduce else d

    def __repr__(self) -> str:
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        kept = f"{lo}" if lo == hi else f"{lo}..{hi}"
        return (
            f"TokenPlan(batch={self.batch}, heads={self.heads}, seq_len={self.seq_len}, "
            f"kept={kept}, density={self.density():.3f})"
        )
