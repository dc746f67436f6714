"""Dense and block-sparse plans (``DensePlan``, ``BlockPlan``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..settings import value_checks
from .geometry import (
    causal_mask,
    cdiv,
    check_causal_lengths,
    check_index_tensor,
    check_int,
    check_qk_heads,
    last_visible_block,
    total_visible_pairs,
    visible_pairs,
)


@dataclass(frozen=True, repr=False, eq=False)
class DensePlan:
    """Every (causal-)visible pair is computed."""

    q_len: int
    kv_len: int
    causal: bool = True

    def __post_init__(self):
        check_int("q_len", self.q_len)
        check_int("kv_len", self.kv_len)
        check_causal_lengths(self.q_len, self.kv_len, self.causal)

    kind = "dense"

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.shape[2] != self.q_len or k.shape[2] != self.kv_len:
            raise ValueError(
                f"plan is for q_len={self.q_len}, kv_len={self.kv_len}; got q with "
                f"{q.shape[2]} and k with {k.shape[2]} positions"
            )

    def to_mask(self) -> torch.Tensor:
        """Bool ``[1, 1, Nq, Nk]`` (broadcasts over batch and heads)."""
        if self.causal:
            return causal_mask(self.q_len, self.kv_len)[None, None]
        return torch.ones(1, 1, self.q_len, self.kv_len, dtype=torch.bool)

    def density(self) -> float:
        return 1.0

    def __repr__(self) -> str:
        return f"DensePlan(q_len={self.q_len}, kv_len={self.kv_len}, causal={self.causal})"


@dataclass(frozen=True, repr=False, eq=False)
class BlockPlan:
    """Block-sparse plan in a BCSR-like layout.

    ``kv_indices[b, h, I, :kv_counts[b, h, I]]`` are the key blocks query block ``I`` attends to,
    strictly ascending. Slots at or beyond ``kv_counts`` are ignored (constructors fill them
    with -1). ``h`` runs over Hq (per query head) or Hkv (per KV head: the plan is shared by
    the query heads of that group). Inside a selected block the token-level causal rule and
    the key-padding mask still apply.
    """

    kv_indices: torch.Tensor  # [B, H, Nqb, Kmax] int32/int64
    kv_counts: torch.Tensor  # [B, H, Nqb]
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    causal: bool = True

    kind = "block"

    def __post_init__(self):
        for name in ("block_q", "block_k", "q_len", "kv_len"):
            check_int(name, getattr(self, name))
        check_causal_lengths(self.q_len, self.kv_len, self.causal)
        check_index_tensor("kv_indices", self.kv_indices, 4)
        check_index_tensor("kv_counts", self.kv_counts, 3)
        if self.kv_counts.shape != self.kv_indices.shape[:3]:
            raise ValueError(
                f"kv_counts shape {tuple(self.kv_counts.shape)} must equal kv_indices.shape[:3] "
                f"= {tuple(self.kv_indices.shape[:3])}"
            )
        if self.kv_indices.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_indices has {self.kv_indices.shape[2]} query blocks; q_len={self.q_len} with "
                f"block_q={self.block_q} needs {self.num_q_blocks}"
            )
        if self.kv_counts.device != self.kv_indices.device:
            raise ValueError("kv_counts and kv_indices must be on the same device")

    # -- shape ---------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return cdiv(self.kv_len, self.block_k)

    @property
    def max_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def offset(self) -> int:
        """Key position of query row 0 under bottom-right causal alignment."""
        return self.kv_len - self.q_len

    def last_visible_block(self) -> torch.Tensor:
        """``[Nqb]`` index of the right-most key block each query block can see (causal)."""
        return last_visible_block(self.q_len, self.kv_len, self.block_q, self.block_k,
                                  self.kv_indices.device)

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_q: int, block_k: int, q_len: int,
                        kv_len: int, causal: bool = True, max_blocks: int | None = None) -> BlockPlan:
        """From a bool ``[B, H, Nqb, Nkb]`` block mask (block-level, so (N/b)^2, not N^2).

        ``max_blocks`` sizes ``kv_indices``' last dim; it must bound every row's count (a selector
        that knows its budget passes it). Without it the width is exact where attnzoo reads tensor
        values on the host (the CPU, see ``attnzoo.settings``) and ``Nkb`` elsewhere: finding the
        exact width would read the counts, a host sync per plan on a GPU.
        """
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError("block_mask must be a bool torch.Tensor")
        if block_mask.ndim != 4:
            raise ValueError(f"block_mask must be [B, H, Nqb, Nkb], got {tuple(block_mask.shape)}")
        nkb = cdiv(kv_len, block_k)
        if block_mask.shape[3] != nkb:
            raise ValueError(f"block_mask has {block_mask.shape[3]} key blocks, expected {nkb}")
        counts = block_mask.sum(-1, dtype=torch.int32)
        if max_blocks is not None:
            check_int("max_blocks", max_blocks)
            kmax = min(max_blocks, nkb)
        elif value_checks(block_mask.device):  # reading the counts is free where values may be read
            kmax = max(int(counts.max()) if counts.numel() else 0, 1)
        else:
            kmax = max(nkb, 1)
        # stable sort puts the selected blocks first, in ascending order
        order = torch.sort((~block_mask).to(torch.uint8), dim=-1, stable=True).indices[..., :kmax]
        slot = torch.arange(kmax, device=block_mask.device)
        indices = torch.where(slot < counts[..., None], order, -1).to(torch.int32)
        return cls(indices, counts, block_q, block_k, q_len, kv_len, causal)

    @classmethod
    def full(cls, batch: int, heads: int, q_len: int, kv_len: int, block_q: int, block_k: int,
             causal: bool = True, device=None) -> BlockPlan:
        """Every (causal-)visible block: dense attention written as a block plan."""
        for name, value in (("batch", batch), ("heads", heads), ("q_len", q_len), ("kv_len", kv_len),
                            ("block_q", block_q), ("block_k", block_k)):
            check_int(name, value)
        nqb, nkb = cdiv(q_len, block_q), cdiv(kv_len, block_k)
        mask = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
        if causal:
            last = last_visible_block(q_len, kv_len, block_q, block_k, device)
            mask = torch.arange(nkb, device=device)[None, :] <= last[:, None]
        mask = mask.expand(batch, heads, nqb, nkb)
        return cls.from_block_mask(mask, block_q, block_k, q_len, kv_len, causal)

    # -- contract ------------------------------------------------------------------------
    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Check the plan against q ``[B, Hq, Nq, D]`` and k ``[B, Hkv, Nk, D]``."""
        if q.shape[2] != self.q_len or k.shape[2] != self.kv_len:
            raise ValueError(
                f"plan is for q_len={self.q_len}, kv_len={self.kv_len}; got q with {q.shape[2]} "
                f"and k with {k.shape[2]} positions"
            )
        if self.batch != q.shape[0]:
            raise ValueError(f"plan has batch {self.batch}, q has batch {q.shape[0]}")
        check_qk_heads(q, k, self.heads, "plan (kv_indices)")
        if self.kv_indices.device != q.device:
            raise ValueError(f"plan is on {self.kv_indices.device}, q is on {q.device}")
        if value_checks(q.device):  # reads index values: a host sync on a GPU (see settings)
            self.check_indices()

    def check_indices(self) -> None:
        """Content checks: counts in range, indices in range, strictly ascending, causal."""
        idx, cnt = self.kv_indices.long(), self.kv_counts.long()
        if ((cnt < 0) | (cnt > self.max_blocks)).any():
            raise ValueError(f"kv_counts must lie in [0, {self.max_blocks}] (kv_indices.shape[-1])")
        valid = torch.arange(self.max_blocks, device=idx.device) < cnt[..., None]
        bad = valid & ((idx < 0) | (idx >= self.num_kv_blocks))
        if bad.any():
            where = tuple(int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"kv_indices out of range [0, {self.num_kv_blocks}) at [b, h, I, slot]={where}: "
                f"{int(idx[where])}"
            )
        step_bad = valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
        if step_bad.any():
            where = tuple(int(x) for x in step_bad.nonzero()[0])
            raise ValueError(f"kv_indices must be strictly ascending; not at [b, h, I, slot]={where}")
        if self.causal:
            last = self.last_visible_block()[None, None, :, None]
            beyond = valid & (idx > last)
            if beyond.any():
                b, h, i, s = (int(x) for x in beyond.nonzero()[0])
                raise ValueError(
                    f"kv_indices: key block {int(idx[b, h, i, s])} for query block {i} "
                    f"(b={b}, h={h}) lies right of the causal diagonal (last visible block "
                    f"{int(last[0, 0, i, 0])})"
                )

    def to_block_mask(self) -> torch.Tensor:
        """Bool ``[B, H, Nqb, Nkb]``: which blocks are selected."""
        valid = torch.arange(self.max_blocks, device=self.kv_indices.device) < self.kv_counts[..., None]
        out = torch.zeros(*self.kv_indices.shape[:3], self.num_kv_blocks + 1, dtype=torch.bool,
                          device=self.kv_indices.device)
        # invalid slots write into the spare column, which is dropped
        col = torch.where(valid, self.kv_indices.long(), self.num_kv_blocks)
        out.scatter_(-1, col, True)
        return out[..., : self.num_kv_blocks]

    def to_mask(self) -> torch.Tensor:
        """Dense bool ``[B, H, Nq, Nk]``, token-level causal rule applied. Tests / small N only."""
        bm = self.to_block_mask()
        m = bm.repeat_interleave(self.block_q, 2)[:, :, : self.q_len]
        m = m.repeat_interleave(self.block_k, 3)[..., : self.kv_len]
        if self.causal:
            m = m & causal_mask(self.q_len, self.kv_len, device=m.device)
        return m

    def computed_pairs(self) -> torch.Tensor:
        """``[B, H]`` number of query-key pairs the plan computes (causal rule inside blocks)."""
        dev = self.kv_indices.device
        qb = torch.arange(self.num_q_blocks, device=dev)[:, None]
        i0, i1 = qb * self.block_q, torch.clamp((qb + 1) * self.block_q, max=self.q_len)
        j = self.kv_indices.long().clamp(min=0)
        j0, j1 = j * self.block_k, torch.clamp((j + 1) * self.block_k, max=self.kv_len)
        pairs = visible_pairs(i0, i1, j0, j1, self.offset, self.causal)
        valid = torch.arange(self.max_blocks, device=dev) < self.kv_counts[..., None]
        return (pairs * valid).sum((-1, -2))

    def total_pairs(self) -> int:
        return total_visible_pairs(self.q_len, self.kv_len, self.causal)

    def density(self, reduce: bool = True):
        """Fraction of (causal-)visible pairs computed: a float, or ``[B, H]`` if not reduced."""
        d = self.computed_pairs().double() / self.total_pairs()
        return float(d.mean()) if reduce else d

    def __repr__(self) -> str:
        return (
            f"BlockPlan(batch={self.batch}, heads={self.heads}, q_len={self.q_len}, "
            f"kv_len={self.kv_len}, block={self.block_q}x{self.block_k}, "
            f"blocks={self.num_q_blocks}x{self.num_kv_blocks}, max_blocks={self.max_blocks}, "
            f"causal={self.causal}, density={self.density():.3f})"
        )

    def show(self, b: int = 0, h: int = 0) -> str:
        """ASCII picture of one head's block pattern ('#' computed, '.' causal-visible, ' ')."""
        bm = self.to_block_mask()[b, h]
        last = self.last_visible_block() if self.causal else None
        rows = []
        for i in range(self.num_q_blocks):
            row = ""
            for j in range(self.num_kv_blocks):
                if bm[i, j]:
                    row += "#"
                elif last is None or j <= int(last[i]):
                    row += "."
                else:
                    row += " "
            rows.append(row)
        return "\n".join(rows)
