"""Triton block selection (the ``block_select`` op, see ``ops.selection``): one program per row.

A row (batch, head, query block) is loaded whole, as int64 keys that order blocks by descending
score and then ascending index (fp32 bits shifted over the reversed index: no two keys tie), and
sorted in registers. The rule then finds the first key it does *not* take -- after ``n_pick`` keys,
or where the mass kept before a block reaches the target -- and every block whose key is larger is
chosen; the forced blocks are added; a prefix sum of the chosen flags gives each chosen block its
slot, so the ascending index list is written without a second sort. Scores, sort, threshold and
index list: one launch instead of ~30 small torch ops (each ~20-30 us of host time on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting


@triton.jit
def _select_kernel(
    S, TAU, KEEP_ALL, LAST, N_PICK, OWN_LO, IDX, CNT,
    ss_bh, ss_i, si_bh, si_i, sc_bh,
    H, nkb, width,
    BY_MASS: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, NP2: tl.constexpr,
):
    I = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    col = tl.arange(0, NP2)
    in_row = col < nkb
    last = tl.load(LAST + I)
    rev = (NP2 - 1 - col).to(tl.int64)
    if BY_MASS:
        w = tl.load(S + bh * ss_bh + I * ss_i + col, mask=in_row, other=0.0)  # the row's total counts all
        forced = col < 0
        if KEEP_DIAG:
            forced = forced | (col == last)
        if KEEP_SINK:
            forced = forced | (col == 0)
        forced = forced & (col <= last)
        cand = (col <= last) & ~forced
        bits = tl.maximum(w, 0.0).to(tl.int32, bitcast=True).to(tl.int64)
        keys = tl.where(cand, (bits << 24) | rev, -1)
        # masses in fp64, as the torch backend: rounding cannot move the threshold between them
        w64 = w.to(tl.float64)
        target = tl.load(TAU + h).to(tl.float64) * tl.sum(w64, 0)
        forced_mass = tl.sum(tl.where(forced, w64, 0.0), 0)
        keep_all = tl.load(KEEP_ALL + h) != 0
        ranked = tl.sort(keys, descending=True)
        mass = tl.where(ranked >= 0, (ranked >> 24).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64), 0.0)
        before = tl.cumsum(mass, 0) - mass + forced_mass
        take = (ranked >= 0) & ((before < target) | keep_all)
        n_take = tl.sum(take.to(tl.int32), 0)
    else:
        keys = tl.load(S + bh * ss_bh + I * ss_i + col, mask=in_row, other=-1)
        own_lo = tl.load(OWN_LO + I)
        forced = (col >= own_lo) & (col <= last)
        ranked = tl.sort(keys, descending=True)
        n_take = tl.minimum(tl.load(N_PICK + I), tl.sum((ranked >= 0).to(tl.int32), 0))
    # the first key not taken (-1 when every candidate is): larger keys are exactly the taken ones
    first_out = tl.max(tl.where(col == n_take, ranked, -1), 0)
    chosen = ((keys > first_out) & (keys >= 0)) | forced
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(IDX + bh * si_bh + I * si_i + slot, col.to(tl.int32), mask=chosen & (slot < width))
    tl.store(CNT + bh * sc_bh + I, tl.sum(chosen.to(tl.int32), 0))


def _launch(rule, scores, width, tau=None, keep_all=None, last=None, n_pick=None, own_lo=None,
            keep_sink=True, keep_diagonal=True):
    B, H, nqb, nkb = scores.shape
    s = scores.reshape(B * H, nqb, nkb)
    if s.stride(-1) != 1:
        s = s.contiguous()
    idx = torch.full((B * H, nqb, width), -1, dtype=torch.int32, device=scores.device) if interpreting() \
        else torch.empty((B * H, nqb, width), dtype=torch.int32, device=scores.device)
    cnt = torch.empty((B * H, nqb), dtype=torch.int32, device=scores.device)
    last = last.to(torch.int32).contiguous()
    dummy = last
    np2 = triton.next_power_of_2(nkb)
    meta = dict(BY_MASS=rule == "by_mass", KEEP_SINK=keep_sink, KEEP_DIAG=keep_diagonal, NP2=np2)
    if not interpreting():
        meta["num_warps"] = 4 if np2 <= 512 else 8
    _select_kernel[(nqb, B * H)](
        s, tau.reshape(-1).float().contiguous() if tau is not None else s,
        keep_all.reshape(-1).to(torch.int8).contiguous() if keep_all is not None else dummy, last,
        n_pick.to(torch.int32).contiguous() if n_pick is not None else dummy,
        own_lo.to(torch.int32).contiguous() if own_lo is not None else dummy, idx, cnt,
        s.stride(0), s.stride(1), idx.stride(0), idx.stride(1), cnt.stride(0), H, nkb, width, **meta)
    return idx.view(B, H, nqb, width), cnt.view(B, H, nqb)


def select(rule: str, scores, **kw):
    if rule == "by_mass":
        return _launch(rule, scores.float(), scores.shape[-1], tau=kw["tau"], keep_all=kw["keep_all"],
                       last=kw["last"], keep_sink=kw["keep_sink"], keep_diagonal=kw["keep_diagonal"])
    return _launch(rule, scores, kw["width"] + 2, last=kw["last"], n_pick=kw["n_pick"], own_lo=kw["own_lo"])
