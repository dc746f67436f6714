"""Triton Quest page scores for a decode step (the ``page_scores`` op, see ``ops.pages``).

Program (tile of PT pages, batch x KV head) reads the tile's bounds once and scores them for every
query head of the group, one head at a time: ``sum_d q_d * (hi_d if q_d > 0 else lo_d)`` (= ``relu(q)
. hi + min(q, 0) . lo``), a select and a multiply-add per bound element in fp32 (no TF32 rounding enters
the ranking). Two ``tl.dot``s on the group padded to 16 rows (fp32 "ieee") did the same at 0.100 ms for
8,192 pages of 32/8 heads on an H100, a tenth of the bandwidth (bench/results/2026-12-07-h100-decode-rank:
the padded FMA product and its layout shuffles, not the bounds' read, set the time). Then it writes ranking keys
(``ops.pages.order_keys``: the bound's fp32 bits mapped to a non-negative int32 order). The last
page, the only one still growing, has its bounds recomputed from its keys in every program (at most
one page of keys) and stored by the program whose tile holds it. With ``per_kv_head`` the program
keeps the group's highest key per page and writes one row per KV head. One launch replaces the reference
backend's chain of torch ops (the last page's min / max, masking, two batched products, the key map).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...caches import device_constant
from ..pages import SINK_KEY


@triton.jit(do_not_specialize=["n_pages", "Nk"])  # lengths: see _triton.py
def _page_scores_kernel(Q, LO, HI, K, KPM, S, META,
                        sqb, sqh, sqd, slb, slh, slp, sld, skb, skh, skn, skd, ssb, ssh,
                        Hkv, n_pages, Nk,
                        D: tl.constexpr, P: tl.constexpr, PT: tl.constexpr, G: tl.constexpr,
                        HAS_KPM: tl.constexpr, UPDATE: tl.constexpr, SINK: tl.constexpr, GROUP: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    offs_d = tl.arange(0, D)
    pages = t * PT + tl.arange(0, PT)
    in_range = pages < n_pages
    last = tl.load(META)  # the query's own page (read on the device: a static decode's moves each step)
    forced_lo = tl.load(META + 1)
    base = LO + b * slb + hkv * slh
    lo = tl.load(base + pages[:, None] * slp + offs_d[None, :] * sld, mask=in_range[:, None], other=0.0).to(tl.float32)
    base_hi = HI + b * slb + hkv * slh
    hi = tl.load(base_hi + pages[:, None] * slp + offs_d[None, :] * sld, mask=in_range[:, None],
                 other=0.0).to(tl.float32)
    if UPDATE:
        kpos = last * P + tl.arange(0, P)
        ok = kpos < Nk
        if HAS_KPM:
            ok = ok & (tl.load(KPM + b * Nk + kpos, mask=ok, other=0) != 0)
        kk = tl.load(K + b * skb + hkv * skh + kpos[:, None] * skn + offs_d[None, :] * skd, mask=ok[:, None],
                     other=0.0).to(tl.float32)
        lo_new = tl.min(tl.where(ok[:, None], kk, float("inf")), 0)
        hi_new = tl.max(tl.where(ok[:, None], kk, float("-inf")), 0)
        is_last = (pages == last)[:, None]
        lo = tl.where(is_last, lo_new[None, :], lo)
        hi = tl.where(is_last, hi_new[None, :], hi)
        own = (offs_d * 0 + t) == last // PT  # (a vector: the interpreter rejects scalar masks)
        tl.store(base + last * slp + offs_d * sld, lo_new.to(LO.dtype.element_ty), mask=own)
        tl.store(base_hi + last * slp + offs_d * sld, hi_new.to(HI.dtype.element_ty), mask=own)
    empty = tl.min(lo, 1) == float("inf")  # a page of padding only
    lo = tl.where(lo == float("inf"), 0.0, lo)
    hi = tl.where(hi == float("-inf"), 0.0, hi)
    forced = (pages == 0) | (pages >= forced_lo)  # the same for every head of the group
    best = tl.full([PT], -1.0, tl.float32)
    for gi in tl.static_range(G):
        head = hkv * G + gi
        q = tl.load(Q + b * sqb + head * sqh + offs_d * sqd).to(tl.float32)
        bound = tl.sum(tl.where(q[None, :] > 0, hi, lo) * q[None, :], 1)  # [PT]
        bits = bound.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        key = tl.where(bits < 0, (0x7FFFFFFF - mag) >> 2, (mag >> 2) + (1 << 29))
        key = tl.where(empty, -1, key)
        key = tl.where(forced, SINK, key)
        key = tl.where(pages >= last, -1, key)  # the own page (top_n's forced block) and unwritten ones
        score = tl.where(key >= 0, key.to(tl.float32, bitcast=True), -1.0)
        if GROUP:  # the group's best bound (non-negative keys order as floats too)
            best = tl.maximum(best, score)
        else:
            tl.store(S + b * ssb + head * ssh + pages, score, mask=in_range)
    if GROUP:
        tl.store(S + b * ssb + hkv * ssh + pages, best, mask=in_range)


def page_scores(q, lo, hi, *, n_pages: int, forced_lo, page_size: int, k=None, key_padding_mask=None,
                per_kv_head=False, own_page=None):
    B, Hq, _, D = q.shape
    Hkv = lo.shape[1]
    g = Hq // Hkv
    s = torch.empty(B, Hkv if per_kv_head else Hq, 1, n_pages, dtype=torch.float32, device=q.device)
    pt = 64 if D > 64 else 128
    kk = k if k is not None else lo
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else q
    nk = k.shape[2] if k is not None else 0
    if own_page is None:
        meta = device_constant((n_pages - 1, forced_lo), torch.int32, str(q.device))
    else:
        meta = torch.cat([own_page, forced_lo]).to(torch.int32)
    _page_scores_kernel[(triton.cdiv(n_pages, pt), B * Hkv)](
        q, lo, hi, kk, kpm, s, meta,
        q.stride(0), q.stride(1), q.stride(3), lo.stride(0), lo.stride(1), lo.stride(2), lo.stride(3),
        kk.stride(0), kk.stride(1), kk.stride(2), kk.stride(3), s.stride(0), s.stride(1),
        Hkv, n_pages, nk,
        D=D, P=page_size, PT=pt, G=g, HAS_KPM=key_padding_mask is not None,
        UPDATE=k is not None, SINK=SINK_KEY, GROUP=per_kv_head)
    return s
