"""Plans: *what* each attention head computes, separate from *how* (``attnzoo.ops``).

A selector looks at q/k and writes a plan; an op consumes it. Every plan can

- ``validate(q, k)``  check itself against the tensors it will be applied to (clear errors);
- ``to_mask()``       expand to a dense boolean mask — for tests and small N only;
- ``density()``       fraction of causal-visible query-key pairs that are actually computed;
- ``repr``            describe itself in one readable line.

Causality is bottom-right aligned: with Nq queries and Nk >= Nq keys, query i sees keys
``<= Nk - Nq + i``. Query blocks tile the query tensor's rows from row 0, key blocks tile the
key tensor from key 0; the last block of either may be partial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import value_checks

__all__ = ["DensePlan", "BlockPlan", "TokenPlan", "HeadPlan", "MixedPlan", "visible_pairs", "cdiv",
           "last_visible_block", "causal_mask", "streaming_block_mask"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_index_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def _check_causal_lengths(q_len: int, kv_len: int, causal: bool) -> None:
    if causal and kv_len < q_len:
        raise ValueError(
            f"causal attention needs kv_len >= q_len (bottom-right aligned), got q_len={q_len}, "
            f"kv_len={kv_len}"
        )


def _check_qk_heads(q: torch.Tensor, k: torch.Tensor, plan_heads: int, what: str) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    if plan_heads not in (hq, hkv):
        raise ValueError(
            f"{what} has {plan_heads} heads; expected Hq={hq} (per query head) or Hkv={hkv} "
            f"(per KV head, shared by its query group)"
        )


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Dense bottom-right causal mask ``[q_len, kv_len]`` (True = visible). Tests/small N only."""
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= qpos


def last_visible_block(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """``[ceil(q_len/block_q)]``: right-most key block each query block can see (bottom-right causal)."""
    nqb = cdiv(q_len, block_q)
    last_row = torch.clamp((torch.arange(nqb, device=device) + 1) * block_q, max=q_len) - 1
    return (last_row + kv_len - q_len) // block_k


def streaming_block_mask(q_len: int, kv_len: int, block: int, sink, local, device=None) -> torch.Tensor:
    """Bool ``[..., Nqb, Nkb]`` of the sink + local-window rule (block-aligned, causal), for
    ``sink``/``local`` token counts given as ints or broadcastable int tensors ``[...]``."""
    nqb, nkb = cdiv(q_len, block), cdiv(kv_len, block)
    sink = torch.as_tensor(sink, device=device)[..., None, None]
    local = torch.as_tensor(local, device=device)[..., None, None]
    first_q = (torch.arange(nqb, device=device) * block + (kv_len - q_len))[:, None]
    lo = torch.clamp(first_q - local, min=0) // block  # first block of the local window
    hi = last_visible_block(q_len, kv_len, block, block, device)[:, None]
    col = torch.arange(nkb, device=device)[None, :]
    return (((col >= lo) & (col <= hi)) | (col * block < sink)) & (col <= hi)


def visible_pairs(i0, i1, j0, j1, offset, causal: bool = True) -> torch.Tensor:
    """Number of (i, j) with i in [i0, i1), j in [j0, j1) and (if causal) j <= i + offset.

    Closed form, elementwise over broadcastable int64 tensors: the row counts are a clamped
    linear ramp, so no per-row or N x N tensor is needed.
    """
    i0, i1, j0, j1 = (torch.as_tensor(x, dtype=torch.int64) for x in (i0, i1, j0, j1))
    width = (j1 - j0).clamp(min=0)
    rows = (i1 - i0).clamp(min=0)
    if not causal:
        return rows * width
    # row i sees c(i) = clamp(i + offset - j0 + 1, 0, width) keys of the block
    a = j0 - offset  # first row with c >= 1
    b = j1 - 1 - offset  # first row with c == width
    r0 = torch.maximum(i0, a)
    r1 = torch.minimum(i1, b).clamp(min=r0)  # ramp rows [r0, r1): c(i) = i - a + 1
    n = r1 - r0
    ramp = n * (r0 - a + 1) + n * (n - 1) // 2
    full = (i1 - torch.maximum(i0, b)).clamp(min=0) * width
    return ramp + full


def total_visible_pairs(q_len: int, kv_len: int, causal: bool = True) -> int:
    """Query-key pairs visible under bottom-right causality (plain ints: no tensor, no sync)."""
    if not causal:
        return q_len * kv_len
    off = kv_len - q_len  # row i sees min(i + off + 1, kv_len) keys; off >= 0 for causal plans
    return q_len * (off + 1) + q_len * (q_len - 1) // 2


@dataclass(frozen=True, repr=False, eq=False)
class DensePlan:
    """Every (causal-)visible pair is computed."""

    q_len: int
    kv_len: int
    causal: bool = True

    def __post_init__(self):
        _check_int("q_len", self.q_len)
        _check_int("kv_len", self.kv_len)
        _check_causal_lengths(self.q_len, self.kv_len, self.causal)

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
            _check_int(name, getattr(self, name))
        _check_causal_lengths(self.q_len, self.kv_len, self.causal)
        _check_index_tensor("kv_indices", self.kv_indices, 4)
        _check_index_tensor("kv_counts", self.kv_counts, 3)
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
            _check_int("max_blocks", max_blocks)
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
            _check_int(name, value)
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
        _check_qk_heads(q, k, self.heads, "plan (kv_indices)")
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
        _check_int("seq_len", self.seq_len)
        _check_index_tensor("indices", self.indices, 3)
        _check_index_tensor("lengths", self.lengths, 2)
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
    def from_keep_mask(cls, keep: torch.Tensor) -> TokenPlan:
        """From a bool ``[B, H, N]`` keep mask."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 3:
            raise TypeError("keep must be a bool tensor [B, H, N]")
        lengths = keep.sum(-1)
        kmax = max(int(lengths.max()) if lengths.numel() else 0, 1)
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :kmax]
        slot = torch.arange(kmax, device=keep.device)
        return cls(torch.where(slot < lengths[..., None], order, -1), lengths, keep.shape[-1])

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
        _check_qk_heads(q, k, self.heads, "TokenPlan (indices)")
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


MODES = ("dense", "streaming", "block")


@dataclass(frozen=True, repr=False, eq=False)
class MixedPlan:
    """One mode per (batch, head) — what a routed layer computes, for single-launch kernels.

    ``mode[b, h]`` indexes ``MODES``: dense (every causal block), streaming (the ``streaming``
    selector's sink + local rule with ``sink[b, h]``/``local[b, h]`` tokens, given as ranges,
    not index lists) or block (``block``'s indices for that head; its other rows are ignored).
    Heads run over Hq, or Hkv when the plan is shared by each query group. Every mode uses the
    plan's one block size.
    """

    mode: torch.Tensor  # [B, H] int
    sink: torch.Tensor  # [B, H] tokens (streaming heads)
    local: torch.Tensor  # [B, H] tokens (streaming heads)
    block: BlockPlan | None
    block_size: int
    q_len: int
    kv_len: int
    causal: bool = True

    kind = "mixed"

    def __post_init__(self):
        for name in ("block_size", "q_len", "kv_len"):
            _check_int(name, getattr(self, name))
        _check_causal_lengths(self.q_len, self.kv_len, self.causal)
        for name in ("mode", "sink", "local"):
            _check_index_tensor(name, getattr(self, name), 2)
            if getattr(self, name).shape != self.mode.shape:
                raise ValueError(f"{name} must be [B, H] = {tuple(self.mode.shape)}, "
                                 f"got {tuple(getattr(self, name).shape)}")
        if self.block is not None:
            b = self.block
            if (b.kv_counts.shape[:2] != self.mode.shape or (b.block_q, b.block_k) != (self.block_size,) * 2
                    or (b.q_len, b.kv_len, b.causal) != (self.q_len, self.kv_len, self.causal)):
                raise ValueError(
                    f"block plan (heads {tuple(b.kv_counts.shape[:2])}, block {b.block_q}x{b.block_k}, q_len "
                    f"{b.q_len}, kv_len {b.kv_len}, causal {b.causal}) does not match the mixed plan (heads "
                    f"{tuple(self.mode.shape)}, block {self.block_size}, q_len {self.q_len}, kv_len "
                    f"{self.kv_len}, causal {self.causal})")
        if value_checks(self.mode.device):
            self.check_values()

    def check_values(self) -> None:
        """Content checks (they read the mode/sink/local values: a host sync on a GPU)."""
        if ((self.mode < 0) | (self.mode >= len(MODES))).any():
            raise ValueError(f"mode values must index {MODES}")
        if ((self.sink < 0) | (self.local < 0)).any():
            raise ValueError("sink and local must be >= 0 tokens")
        streaming = (self.mode == MODES.index("streaming")).any()
        if streaming and not self.causal:
            raise ValueError("streaming heads need causal=True")
        if (self.mode == MODES.index("block")).any() and self.block is None:
            raise ValueError("block-mode heads need a BlockPlan in `block`")

    @property
    def batch(self) -> int:
        return self.mode.shape[0]

    @property
    def heads(self) -> int:
        return self.mode.shape[1]

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if q.shape[2] != self.q_len or k.shape[2] != self.kv_len or q.shape[0] != self.batch:
            raise ValueError(f"plan is for batch {self.batch}, q_len={self.q_len}, kv_len={self.kv_len}; "
                             f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
        _check_qk_heads(q, k, self.heads, "plan (mode)")
        if self.mode.device != q.device:
            raise ValueError(f"plan is on {self.mode.device}, q is on {q.device}")
        if value_checks(q.device):
            self.check_values()
            if self.block is not None:
                self.block.check_indices()

    def to_block_plan(self) -> BlockPlan:
        """The same pattern as index lists (block-level tensors, (N/b)^2 per head)."""
        dev, bs = self.mode.device, self.block_size
        dense = BlockPlan.full(1, 1, self.q_len, self.kv_len, bs, bs, self.causal, dev).to_block_mask()[0, 0]
        stream = streaming_block_mask(self.q_len, self.kv_len, bs, self.sink, self.local, dev)
        mask = torch.where((self.mode == MODES.index("streaming"))[..., None, None], stream, dense)
        if self.block is not None:
            mask = torch.where((self.mode == MODES.index("block"))[..., None, None],
                               self.block.to_block_mask(), mask)
        return BlockPlan.from_block_mask(mask, bs, bs, self.q_len, self.kv_len, self.causal)

    def to_mask(self) -> torch.Tensor:
        """Dense bool ``[B, H, Nq, Nk]``. Tests / small N only."""
        return self.to_block_plan().to_mask()

    def density(self, reduce: bool = True):
        return self.to_block_plan().density(reduce)

    def __repr__(self) -> str:
        n = self.mode.numel()
        shares = ", ".join(f"{m}={float((self.mode == i).sum()) / n:.2f}" for i, m in enumerate(MODES))
        return (f"MixedPlan(batch={self.batch}, heads={self.heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"block={self.block_size}, causal={self.causal}, {shares})")


@dataclass(frozen=True, repr=False, eq=False)
class HeadPlan:
    """Which branch each (batch, KV head) runs — a router's output. ``branch`` is ``[B, Hkv]``."""

    branch: torch.Tensor
    labels: tuple[str, ...]

    kind = "head"

    def __post_init__(self):
        _check_index_tensor("branch", self.branch, 2)
        if not isinstance(self.labels, tuple) or not all(isinstance(x, str) for x in self.labels):
            raise TypeError("labels must be a tuple of branch names")
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be non-empty and unique, got {self.labels}")

    @property
    def num_branches(self) -> int:
        return len(self.labels)

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        if tuple(self.branch.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(
                f"HeadPlan.branch must be [B, Hkv] = {(k.shape[0], k.shape[1])}, "
                f"got {tuple(self.branch.shape)}"
            )
        if value_checks(self.branch.device) and ((self.branch < 0) | (self.branch >= self.num_branches)).any():
            raise ValueError(f"HeadPlan.branch values must lie in [0, {self.num_branches})")

    def select(self, b: int) -> HeadPlan:
        """The plan of batch element ``b`` alone (batch 1)."""
        return HeadPlan(self.branch[b:b + 1], self.labels)

    def to_mask(self) -> torch.Tensor:
        """One-hot bool ``[B, Hkv, num_branches]``."""
        return torch.nn.functional.one_hot(self.branch.long(), self.num_branches).bool()

    def share(self) -> dict[str, float]:
        """Fraction of (batch, KV head) slots that run each branch."""
        m = self.to_mask().double().mean((0, 1))
        return {label: float(m[i]) for i, label in enumerate(self.labels)}

    def density(self, branch_density: dict[str, float] | None = None) -> float:
        """Mean density over heads given each branch's density (dense branches = 1.0)."""
        branch_density = branch_density or {}
        return sum(s * branch_density.get(lab, 1.0) for lab, s in self.share().items())

    def __repr__(self) -> str:
        shares = ", ".join(f"{k}={v:.2f}" for k, v in self.share().items())
        return f"HeadPlan(batch={self.branch.shape[0]}, kv_heads={self.branch.shape[1]}, {shares})"
