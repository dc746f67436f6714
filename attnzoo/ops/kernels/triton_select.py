"""Triton block selection (the ``block_select`` op, see ``ops.selection``): one program per row
(batch, head, query block), no sort.

Both rules keep blocks in descending score order up to a cut, so each program finds the cut value
by a binary search over the scores' bits (scores >= 0 order as their int32 bits; 31 counts or
fp64 sums over the row in registers) and keeps what lies above it, then the tied blocks at the cut
in block order -- what a stable descending sort would keep:

- ``by_mass``: the cut u* is the value of the last block taken, the largest u with
  ``forced mass + sum(w >= u) >= tau x total``; ties at u* are taken while the mass kept before each
  stays below the target (fp64 masses, like the torch backend);
- ``top_n``: the cut is the value of the first block *not* taken (the ``n + 1``-th largest), and
  ties at it fill the count.

A prefix sum of the chosen flags over the columns then gives each chosen block its slot, so the
ascending index list is written without a sort or a scatter. (On an H100 at 32K this replaced
torch's radix sort, 0.12-0.30 ms per layer, and ``torch.topk``, slower still.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import settings
from ...caches import shape_cache
from ._triton import interpreting


@triton.jit
def _radix_cut(bits, cand, n_take):
    """The (n_take + 1)-th largest of the candidates' bits (each in [0, 2**31)), four bits at a time
    from the top: 8 histograms of the next digit among the candidates that share the digits found so
    far, where the binary search makes 31 dependent counts. (Meaningless when there are no more than
    n_take candidates: the caller's v_out ignores it then.)"""
    digits = tl.arange(0, 32)
    want = n_take + 1  # rank, from the top, of the value sought among the candidates
    prefix = tl.zeros((), tl.int32)
    for step in tl.static_range(8):
        shift = 28 - 4 * step
        if step == 0:
            match = cand
        else:  # the digits above this one equal the prefix's
            match = cand & ((bits >> (shift + 4)) == (prefix >> (shift + 4)))
        d = tl.where(match, (bits >> shift) & 15, 16)  # bin 16: not in the running
        hist = tl.where(digits < 16, tl.histogram(d, 32), 0)
        # candidates in the running with a digit >= each digit value
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        best = tl.max(tl.where((at_least >= want) & (digits < 16), digits, 0), 0)
        above = tl.sum(tl.where(digits > best, hist, 0), 0)
        want = want - above
        prefix = prefix | (best << shift)
    return prefix


@triton.jit(do_not_specialize=["nkb", "width"])  # lengths: see _triton.py
def _select_kernel(
    S, TAU, KEEP_ALL, LAST, N_PICK, OWN_LO, IDX, CNT,
    ss_bh, ss_i, si_bh, si_i, sc_bh,
    H, nkb, width,
    BY_MASS: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, NP2: tl.constexpr,
    RADIX: tl.constexpr = False,
):
    I = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    col = tl.arange(0, NP2)
    in_row = col < nkb
    row = bh * ss_bh + I * ss_i
    last = tl.load(LAST + I)
    s = tl.load(S + row + col, mask=in_row, other=-1.0)
    if BY_MASS:
        forced = col < 0
        if KEEP_DIAG:
            forced = forced | (col == last)
        if KEEP_SINK:
            forced = forced | (col == 0)
        forced = forced & (col <= last)
        cand = (col <= last) & ~forced & in_row
        s64 = tl.where(in_row, s, 0.0).to(tl.float64)
        # fp64 masses, as the torch backend: rounding cannot move the threshold between them
        target = tl.load(TAU + h).to(tl.float64) * tl.sum(s64, 0)
        forced_mass = tl.sum(tl.where(forced, s64, 0.0), 0)
        cand_mass = tl.where(cand, tl.maximum(s, 0.0), 0.0).to(tl.float64)
        # In descending order a block is taken while the mass kept before it is below the target.
        # The last block taken has the value u* = the largest u with forced + sum(w >= u) >= target
        # (found by a binary search over the bits, scores >= 0 ordering as their int32 bits):
        # every candidate above u* is taken, and of those equal to u* (in block order, as a stable
        # sort puts them) each while the mass before it stays below the target.
        bits = tl.where(cand, tl.where(s == 0, 0, s.to(tl.int32, bitcast=True)), -1)
        lo = tl.zeros((), tl.int32)
        hi = tl.full((), 0x7F800001, tl.int32)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            enough = forced_mass + tl.sum(tl.where(bits >= mid, cand_mass, 0.0), 0) >= target
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        above = cand & (bits > lo)
        tie = cand & (bits == lo)
        before_ties = forced_mass + tl.sum(tl.where(above, cand_mass, 0.0), 0)
        tie_mass = tl.where(tie, cand_mass, 0.0)
        tie_taken = tie & (before_ties + tl.cumsum(tie_mass, 0) - tie_mass < target)
        # not even every candidate reaches the target (or tau >= 1): all are taken
        take_all = ((forced_mass + tl.sum(cand_mass, 0) < target) | (tl.load(KEEP_ALL + h) != 0)).to(tl.int32)
        # (a vector of col's shape: the interpreter rejects scalar & vector on bools)
        chosen = forced | (cand & ((col * 0 + take_all) != 0)) | above | tie_taken
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
        if RADIX:
            lo = _radix_cut(bits, cand, n_take)
        else:
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


def _launch(rule, s, width, tau=None, keep_all=None, last=None, n_pick=None, own_lo=None,
            keep_sink=True, keep_diagonal=True, num_warps=None, radix=None):
    B, H, nqb, nkb = s.shape
    s = s.reshape(B * H, nqb, nkb).contiguous()
    alloc = torch.full if interpreting() else (lambda shape, fill, **kw: torch.empty(shape, **kw))
    idx = alloc((B * H, nqb, width), -1, dtype=torch.int32, device=s.device)
    cnt = torch.empty((B * H, nqb), dtype=torch.int32, device=s.device)
    last = _int32(last)
    np2 = triton.next_power_of_2(nkb)
    if radix is None:  # a decode step's few rows: latency-bound, the fewer dependent steps the better
        forced = settings.get("select_radix")
        radix = rule == "top_n" and (nqb == 1 if forced is None else forced)
    meta = dict(BY_MASS=rule == "by_mass", KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal, NP2=np2, RADIX=radix)
    if not interpreting():  # (num_warps: bench/gpu/decode_rank.py sweeps it)
        meta["num_warps"] = num_warps or (4 if np2 <= 1024 else 8)
    _select_kernel[(nqb, B * H)](
        s, _flat(tau, torch.float32) if tau is not None else s,
        _flat(keep_all, torch.int8) if keep_all is not None else last, last,
        _int32(n_pick) if n_pick is not None else last, _int32(own_lo) if own_lo is not None else last, idx, cnt,
        s.stride(0), s.stride(1), idx.stride(0), idx.stride(1), cnt.stride(0), H, nkb, width, **meta)
    return idx.view(B, H, nqb, width), cnt.view(B, H, nqb)


@shape_cache(64)
def _int32(t: torch.Tensor) -> torch.Tensor:
    """The per-shape index tensors the selectors cache, converted once (keyed by identity; the cache
    holds the tensor, so the identity stays valid)."""
    return t.to(torch.int32).contiguous()


@shape_cache(64)
def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1).to(dtype).contiguous()


def select(rule: str, scores, **kw):
    s = scores.float()
    # no sort: the kernel finds each row's cut value by a binary search
    if rule == "by_mass":
        return _launch(rule, s, s.shape[-1], tau=kw["tau"], keep_all=kw["keep_all"], last=kw["last"],
                       keep_sink=kw["keep_sink"], keep_diagonal=kw["keep_diagonal"])
    return _launch(rule, s, kw["width"] + 2, last=kw["last"], n_pick=kw["n_pick"], own_lo=kw["own_lo"])
