"""Triton top-k block scores from mean-pooled keys (the ``pooled_scores`` op, see ``ops.pooled``).

A program owns ``QB`` query blocks of one KV head and walks the group's query heads: pass 1 finds
each query row's softmax max and sum over its candidate key blocks (complete past blocks with a
real key) and keeps them in a small scratch buffer; pass 2 recomputes the scores per column tile,
normalises them and sums them over each query block's rows and over the group's heads, then
stores ``[QB, C_TILE]`` of the output once. Nothing of size Nq x Nkb is stored; no atomics (the sum
over heads happens in registers, in a fixed order, so the scores are deterministic).

Pooled keys are fp32 means; for 16-bit queries the kernel splits them into a bf16/fp16 high part
plus the rounding remainder, two tensor-core dots that keep ~16 bits of the mean (an fp32 dot
would run without tensor cores, slower than the attention it selects for).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..pooled import pooled_keys
from ._triton import interpreting

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _tile_scores(q, KM, k_base, cols, nkb, offs_d, skj, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores of the [R, D] query tile against pooled-key columns ``cols`` (fp32 accumulate)."""
    c_ok = cols < nkb
    km = tl.load(KM + k_base + cols[None, :] * skj + offs_d[:, None], mask=c_ok[None, :], other=0.0)
    if SPLIT:  # fp32 means as a 16-bit high part plus the rounding remainder: two tensor-core dots
        kh = km.to(q.dtype)
        s = tl.dot(q, kh, input_precision=DOT_PREC)
        s += tl.dot(q, (km - kh.to(tl.float32)).to(q.dtype), input_precision=DOT_PREC)
    else:
        s = tl.dot(q, km, input_precision=DOT_PREC)
    return s


@triton.jit
def _allowed(REAL, KPM, b, rows, cols, Nq, Nk, nkb, offset, BLOCK: tl.constexpr, HAS_KPM: tl.constexpr):
    """[R, C]: row r (a real query) may score key block J (a complete past block with a real key)."""
    row_ok = rows < Nq
    if HAS_KPM:
        row_ok = row_ok & (tl.load(KPM + b * Nk + rows + offset, mask=row_ok, other=0) != 0)
    col_ok = cols < nkb
    if HAS_KPM:
        col_ok = col_ok & (tl.load(REAL + b * nkb + cols, mask=cols < nkb, other=0) != 0)
    first_q = (rows // BLOCK) * BLOCK + offset  # first query position of each row's block
    end = (cols + 1) * BLOCK
    past = (end[None, :] - 1 <= first_q[:, None]) & (end[None, :] <= Nk)
    return row_ok[:, None] & col_ok[None, :] & past


@triton.jit
def _pooled_kernel(
    Q, KM, REAL, KPM, M, L, OUT,
    sqb, sqh, sqn, skb, skh, skj, sob, soh, soi,
    Hq, Hkv, Nq, Nk, nqb, nkb, qk_scale,
    BLOCK: tl.constexpr, QB: tl.constexpr, HEAD_DIM: tl.constexpr, C_TILE: tl.constexpr,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, MASKED: tl.constexpr,
):
    R: tl.constexpr = QB * BLOCK
    I0 = tl.program_id(0) * QB
    pid = tl.program_id(1)
    b = pid // Hkv
    hkv = pid % Hkv
    offset = Nk - Nq
    rows = I0 * BLOCK + tl.arange(0, R)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = b * skb + hkv * skh
    # candidates are complete past blocks: none lies right of the tile's last query
    last_first_q = tl.minimum(I0 + QB, nqb) * BLOCK - BLOCK + offset
    ncol = tl.minimum(nkb, (last_first_q + 1) // BLOCK)

    for gi in range(GROUP):  # pass 1, per head: softmax max and sum of each row
        hq = hkv * GROUP + gi
        q = tl.load(Q + b * sqb + hq * sqh + rows[:, None] * sqn + offs_d[None, :], mask=rows[:, None] < Nq,
                    other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        for c0 in range(0, ncol, C_TILE):
            cols = c0 + tl.arange(0, C_TILE)
            s = _tile_scores(q, KM, k_base, cols, nkb, offs_d, skj, SPLIT, DOT_PREC) * qk_scale
            s = tl.where(_allowed(REAL, KPM, b, rows, cols, Nq, Nk, nkb, offset, BLOCK, HAS_KPM), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        stat = (b * Hq + hq) * nqb * BLOCK + rows
        tl.store(M + stat, tl.where(m_i == float("-inf"), 0.0, m_i), mask=rows < nqb * BLOCK)
        tl.store(L + stat, tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0), mask=rows < nqb * BLOCK)

    qi = I0 + tl.arange(0, QB)
    out_rows = OUT + b * sob + hkv * soh + qi * soi
    for c0 in range(0, ncol, C_TILE):  # pass 2: normalised probabilities, summed per block and group
        cols = c0 + tl.arange(0, C_TILE)
        ok = _allowed(REAL, KPM, b, rows, cols, Nq, Nk, nkb, offset, BLOCK, HAS_KPM)
        acc = tl.zeros([QB, C_TILE], tl.float32)
        for gi in range(GROUP):
            hq = hkv * GROUP + gi
            q = tl.load(Q + b * sqb + hq * sqh + rows[:, None] * sqn + offs_d[None, :], mask=rows[:, None] < Nq,
                        other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            stat = (b * Hq + hq) * nqb * BLOCK + rows
            m = tl.load(M + stat, mask=rows < nqb * BLOCK, other=0.0)
            inv_l = tl.load(L + stat, mask=rows < nqb * BLOCK, other=0.0)
            s = _tile_scores(q, KM, k_base, cols, nkb, offs_d, skj, SPLIT, DOT_PREC) * qk_scale
            p = tl.where(ok, tl.exp2(s - m[:, None]) * inv_l[:, None], 0.0)
            acc += tl.sum(tl.reshape(p, [QB, BLOCK, C_TILE]), 1)
        store = (qi[:, None] < nqb) & (cols[None, :] < nkb)
        if MASKED:  # -1 where the block is not a candidate (what the selection reads)
            end = (cols[None, :] + 1) * BLOCK
            cand = (end - 1 <= qi[:, None] * BLOCK + offset) & (end <= Nk)
            if HAS_KPM:
                cand = cand & (tl.load(REAL + b * nkb + cols, mask=cols < nkb, other=0) != 0)[None, :]
            acc = tl.where(cand, acc, -1.0)
        tl.store(out_rows[:, None] + cols[None, :], acc, mask=store)


def pooled_scores(q, k, *, block_size: int, chunk_size: int, key_padding_mask=None, masked: bool = False):
    """``[B, Hkv, Nqb, Nkb]`` fp32 scores (-1 at non-candidates if ``masked``), as the torch backend
    (``chunk_size`` is not needed: nothing of size Nq x Nkb is stored)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    b = block_size
    nqb, nkb = -(-Nq // b), -(-Nk // b)
    kmean, real = pooled_keys(k, b, key_padding_mask)  # fp32 [B, Hkv, Nkb, D], bool [B, Nkb]
    upcast = interpreting() and q.dtype != torch.float32
    split = q.dtype != torch.float32 and not upcast
    # blocks the kernel never reaches are not candidates
    out = torch.full((B, Hkv, nqb, nkb), -1.0 if masked else 0.0, dtype=torch.float32, device=q.device)
    stats = torch.empty((2, B, Hq, nqb * b), dtype=torch.float32, device=q.device)  # row max, 1 / row sum
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    qb = max(1, (16 if interpreting() else 64) // b)
    meta = dict(BLOCK=b, QB=qb, HEAD_DIM=D, C_TILE=16 if interpreting() else 64, GROUP=Hq // Hkv, SPLIT=split,
                HAS_KPM=kpm is not None, UPCAST=upcast, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                MASKED=masked)
    if not interpreting():
        meta.update(num_warps=4, num_stages=2)
    grid = (triton.cdiv(nqb, qb), B * Hkv)
    real = kmean if real is None else real.to(torch.int8).contiguous()  # (not read without padding)
    _pooled_kernel[grid](q, kmean, real, kpm if kpm is not None else kmean,
                         stats[0], stats[1], out,
                         q.stride(0), q.stride(1), q.stride(2), kmean.stride(0), kmean.stride(1), kmean.stride(2),
                         out.stride(0), out.stride(1), out.stride(2),
                         Hq, Hkv, Nq, Nk, nqb, nkb, LOG2E / math.sqrt(D), **meta)
    return out
