"""Triton block selection (the ``block_select`` op, see ``ops.selection``).

``by_mass``: each row (batch, head, query block) is first ordered by torch's radix sort
(descending, stable: ties keep the lower block first), far faster on a GPU than a sort in
registers; one Triton program per row then takes the mass kept before each block (a prefix sum in
fp64, like the torch backend) against the target and reads the first block it does *not* take,
``(v*, j*)``. A block is chosen iff it is a candidate and ranks before that one (``w > v*``, or
``w == v*`` and ``j < j*``), or it is forced.

``top_n`` needs no sort at all: the program finds the value of the first block not taken, ``v*``
(the ``n + 1``-th largest candidate score), by a binary search over the scores' bits (31 counts
over the row in registers; at 32K on an H100, 2048 x 2048 scores per KV head, this kernel takes
0.2 ms, where torch's radix sort took 0.3 ms before the old kernel and ``torch.topk`` was slower
still), keeps every candidate above ``v*`` and, of those equal to it, the lowest-indexed ones up to
the count (ties to the lower block).

Either way a prefix sum of the chosen flags over the columns gives each chosen block its slot, so
the ascending index list is written without another sort or a scatter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..selection import causal_block_sets
from ._triton import interpreting


@triton.jit
def _select_kernel(
    S, SV, SO, TAU, KEEP_ALL, LAST, N_PICK, OWN_LO, IDX, CNT,
    ss_bh, ss_i, sv_bh, sv_i, si_bh, si_i, sc_bh,
    H, nkb, n_sorted, width,
    BY_MASS: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, NP2: tl.constexpr,
):
    I = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    col = tl.arange(0, NP2)
    in_row = col < nkb
    row = bh * ss_bh + I * ss_i
    row_v = bh * sv_bh + I * sv_i
    last = tl.load(LAST + I)
    s = tl.load(S + row + col, mask=in_row, other=-1.0)
    if BY_MASS:
        sv = tl.load(SV + row_v + col, mask=in_row, other=-1.0)  # sorted descending; -1 = not a candidate
        forced = col < 0
        if KEEP_DIAG:
            forced = forced | (col == last)
        if KEEP_SINK:
            forced = forced | (col == 0)
        forced = forced & (col <= last)
        cand = (col <= last) & ~forced
        s64 = tl.where(in_row, s, 0.0).to(tl.float64)
        # fp64 masses, as the torch backend: rounding cannot move the threshold between them
        target = tl.load(TAU + h).to(tl.float64) * tl.sum(s64, 0)
        forced_mass = tl.sum(tl.where(forced, s64, 0.0), 0)
        mass = tl.maximum(sv, 0.0).to(tl.float64)
        before = tl.cumsum(mass, 0) - mass + forced_mass
        take = (sv >= 0) & ((before < target) | (tl.load(KEEP_ALL + h) != 0))
        n_take = tl.sum(take.to(tl.int32), 0)
        # the first block not taken (position n_take of the sorted row); -1 if every candidate is taken
        v_out = tl.load(SV + row_v + n_take, mask=n_take < n_sorted, other=-1.0)
        j_out = tl.load(SO + row_v + n_take, mask=n_take < n_sorted, other=0)
        chosen = (cand & ((s > v_out) | ((s == v_out) & (col < j_out)))) | forced
    else:
        own_lo = tl.load(OWN_LO + I)
        forced = (col >= own_lo) & (col <= last)
        cand = (s >= 0) & in_row
        n_take = tl.minimum(tl.load(N_PICK + I), tl.sum(cand.to(tl.int32), 0))
        # the value of the first block not taken: the (n_take + 1)-th largest candidate score, by a
        # binary search over its bits (scores >= 0 order as their int32 bits; -0.0 counts as 0):
        # the largest t with #(bits >= t) > n_take. Absent (-1) when every candidate is taken.
        # (A radix-4 search, 16 steps of three counts, measured slower: 0.31 ms against 0.21.)
        bits = tl.where(cand, tl.where(s == 0, 0, s.to(tl.int32, bitcast=True)), -1)
        lo = tl.zeros((), tl.int32)
        hi = tl.full((), 0x7F800001, tl.int32)  # above +inf: no score reaches it
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            enough = tl.sum((bits >= mid).to(tl.int32), 0) > n_take
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        v_out = tl.where(tl.sum((bits >= 0).to(tl.int32), 0) > n_take, lo, -1)
        above = cand & (bits > v_out)
        tie = cand & (bits == v_out)
        need = n_take - tl.sum(above.to(tl.int32), 0)
        chosen = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need)) | forced
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(IDX + bh * si_bh + I * si_i + slot, col.to(tl.int32), mask=chosen & (slot < width))
    tl.store(CNT + bh * sc_bh + I, tl.sum(chosen.to(tl.int32), 0))


def _launch(rule, s, sv, so, width, tau=None, keep_all=None, last=None, n_pick=None, own_lo=None,
            keep_sink=True, keep_diagonal=True):
    B, H, nqb, nkb = s.shape
    s = s.reshape(B * H, nqb, nkb).contiguous()
    sv = sv.reshape(B * H, nqb, sv.shape[-1]).contiguous()
    so = sv if so is None else so.reshape(B * H, nqb, so.shape[-1]).contiguous()
    alloc = torch.full if interpreting() else (lambda shape, fill, **kw: torch.empty(shape, **kw))
    idx = alloc((B * H, nqb, width), -1, dtype=torch.int32, device=s.device)
    cnt = torch.empty((B * H, nqb), dtype=torch.int32, device=s.device)
    last = _int32(last)
    np2 = triton.next_power_of_2(nkb)
    meta = dict(BY_MASS=rule == "by_mass", KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal, NP2=np2)
    if not interpreting():
        meta["num_warps"] = 4 if np2 <= 1024 else 8
    _select_kernel[(nqb, B * H)](
        s, sv, so, _flat(tau, torch.float32) if tau is not None else s,
        _flat(keep_all, torch.int8) if keep_all is not None else last, last,
        _int32(n_pick) if n_pick is not None else last, _int32(own_lo) if own_lo is not None else last, idx, cnt,
        s.stride(0), s.stride(1), sv.stride(0), sv.stride(1), idx.stride(0), idx.stride(1), cnt.stride(0),
        H, nkb, sv.shape[-1], width, **meta)
    return idx.view(B, H, nqb, width), cnt.view(B, H, nqb)


@functools.lru_cache(maxsize=64)
def _int32(t: torch.Tensor) -> torch.Tensor:
    """The per-shape index tensors the selectors cache, converted once (keyed by identity; the cache
    holds the tensor, so the identity stays valid)."""
    return t.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1).to(dtype).contiguous()


@functools.lru_cache(maxsize=32)
def _dropped(last: torch.Tensor, nkb: int, keep_sink: bool, keep_diagonal: bool) -> torch.Tensor:
    """``[Nqb, Nkb]``: blocks that are not candidates (invisible, sink, diagonal). Keyed by the
    per-shape ``last`` tensor the selector caches (the cache holds it, so its identity is stable)."""
    visible, forced = causal_block_sets(last, nkb, keep_sink, keep_diagonal)
    return ~visible | forced


def select(rule: str, scores, **kw):
    s = scores.float()
    if rule == "by_mass":
        last = kw["last"]
        dropped = _dropped(last, s.shape[-1], kw["keep_sink"], kw["keep_diagonal"])
        sv, so = torch.sort(s.masked_fill(dropped, -1.0), dim=-1, descending=True, stable=True)
        return _launch(rule, s, sv, so, s.shape[-1], tau=kw["tau"], keep_all=kw["keep_all"], last=last,
                       keep_sink=kw["keep_sink"], keep_diagonal=kw["keep_diagonal"])
    # no sort: the kernel finds each row's cut value by a binary search (SV is not read)
    return _launch(rule, s, s, None, kw["width"] + 2, last=kw["last"], n_pick=kw["n_pick"], own_lo=kw["own_lo"])
