"""Triton top-k block scores from mean-pooled keys (the ``pooled_scores`` op, see ``ops.pooled``).

A program owns ``QB`` query blocks of one KV head and walks the group's query heads in a fixed
order; each head's query tile stays on chip for two passes: pass 1 finds each query row's softmax
max and sum over its candidate key blocks (complete past blocks with a real key), pass 2
recomputes the scores per column tile, normalises them, sums them over each query block's rows
and adds them to the group's ``[QB, C_TILE]`` output tile (the program owns it: no atomics, the
scores are deterministic). Nothing of size Nq x Nkb is stored.

Pooled keys are the input's dtype (``ops.pooled.pooled_keys``: fp32 means rounded once), so every
product is one tensor-core dot.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...plans.geometry import cdiv
from ..pooled import pooled_keys
from ._triton import interpreting

LOG2E = 1.0 / math.log(2.0)


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


@triton.jit(do_not_specialize=["Nq", "Nk", "nqb", "nkb"])  # lengths: see _triton.py
def _pooled_kernel(
    Q, KM, REAL, KPM, OUT,
    sqb, sqh, sqn, skb, skh, skj, sob, soh, soi,
    Hkv, Nq, Nk, nqb, nkb, qk_scale,
    BLOCK: tl.constexpr, QB: tl.constexpr, HEAD_DIM: tl.constexpr, C_TILE: tl.constexpr,
    GROUP: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    MASKED: tl.constexpr, SINK_B: tl.constexpr, LOCAL_B: tl.constexpr,
):
    R: tl.constexpr = QB * BLOCK
    # last query blocks first: under causality they walk the most columns (better tail balance)
    I0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * QB
    pid = tl.program_id(1)
    b = pid // Hkv
    hkv = pid % Hkv
    offset = Nk - Nq
    rows = I0 * BLOCK + tl.arange(0, R)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = KM + b * skb + hkv * skh
    # candidates are complete past blocks: none lies right of the tile's last query
    last_first_q = tl.minimum(I0 + QB, nqb) * BLOCK - BLOCK + offset
    ncol = tl.minimum(nkb, (last_first_q + 1) // BLOCK)
    qi = I0 + tl.arange(0, QB)
    out_rows = OUT + b * sob + hkv * soh + qi * soi
    # column tiles wholly in every row's past, with every row real and no padding, need no mask
    # (most tiles: the mask arithmetic is skipped there)
    n_open = 0
    if not HAS_KPM:
        if (I0 + QB) * BLOCK <= Nq:
            n_open = tl.minimum((I0 * BLOCK + offset + 1) // BLOCK, Nk // BLOCK)

    for gi in range(GROUP):  # each head of the group: its query tile stays on chip for both passes
        hq = hkv * GROUP + gi
        q = tl.load(Q + b * sqb + hq * sqh + rows[:, None] * sqn + offs_d[None, :], mask=rows[:, None] < Nq,
                    other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        for c0 in range(0, ncol, C_TILE):  # pass 1: each row's softmax max and sum
            cols = c0 + tl.arange(0, C_TILE)
            km = tl.load(k_base + cols[None, :] * skj + offs_d[:, None], mask=cols[None, :] < nkb, other=0.0)
            if UPCAST:
                km = km.to(tl.float32)
            s = tl.dot(q, km, input_precision=DOT_PREC) * qk_scale
            if c0 + C_TILE > n_open:
                s = tl.where(_allowed(REAL, KPM, b, rows, cols, Nq, Nk, nkb, offset, BLOCK, HAS_KPM), s,
                             float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        m = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        tl.debug_barrier()  # the previous head's stores of the output tiles are visible
        for c0 in range(0, ncol, C_TILE):  # pass 2: normalised probabilities summed per query block
            cols = c0 + tl.arange(0, C_TILE)
            km = tl.load(k_base + cols[None, :] * skj + offs_d[:, None], mask=cols[None, :] < nkb, other=0.0)
            if UPCAST:
                km = km.to(tl.float32)
            s = tl.dot(q, km, input_precision=DOT_PREC) * qk_scale
            p = tl.exp2(s - m[:, None]) * inv_l[:, None]
            if c0 + C_TILE > n_open:
                p = tl.where(_allowed(REAL, KPM, b, rows, cols, Nq, Nk, nkb, offset, BLOCK, HAS_KPM), p, 0.0)
            acc = tl.sum(tl.reshape(p, [QB, BLOCK, C_TILE]), 1)
            store = (qi[:, None] < nqb) & (cols[None, :] < nkb)
            if gi == 0:
                if MASKED:  # -1 where the block is not a candidate (later heads add 0 there)
                    end = (cols[None, :] + 1) * BLOCK
                    cand = (end - 1 <= qi[:, None] * BLOCK + offset) & (end <= Nk)
                    if HAS_KPM:
                        cand = cand & (tl.load(REAL + b * nkb + cols, mask=cols < nkb, other=0) != 0)[None, :]
                    acc = tl.where(cand, acc, -1.0)
            else:  # the group's sum, in a fixed head order: deterministic, no atomics
                acc += tl.load(out_rows[:, None] + cols[None, :], mask=store, other=0.0)
            if SINK_B + LOCAL_B > 0:
                if gi == GROUP - 1:  # sink and local candidates outrank every score (ops.pooled.FIRST)
                    end = (cols[None, :] + 1) * BLOCK
                    cand = (end - 1 <= qi[:, None] * BLOCK + offset) & (end <= Nk)
                    if HAS_KPM:
                        cand = cand & (tl.load(REAL + b * nkb + cols, mask=cols < nkb, other=0) != 0)[None, :]
                    own_lo = tl.minimum((qi * BLOCK + offset + 1) // BLOCK, Nk // BLOCK)  # first own block
                    near = (cols[None, :] < SINK_B) | (cols[None, :] >= own_lo[:, None] - LOCAL_B)
                    acc = tl.where(cand & near, 3.4028234663852886e38, acc)
            tl.store(out_rows[:, None] + cols[None, :], acc, mask=store)


def launch_config(block: int, head_dim: int) -> dict:
    """Tile shapes: >= 64 query rows per program on a GPU, 16 under the interpreter (a module-level
    function: ``bench/gpu/tune.py`` swaps it)."""
    if interpreting():
        return dict(QB=max(1, 16 // block), C_TILE=16)
    # H100, D 64, 16-token blocks (bench/gpu/tune.py): 64 rows x 64 columns, 4 warps, 3 stages
    # 0.83 ms at 32K, 9/3 heads (2 stages 0.88, 8 warps 1.04,
    # 128 rows 0.84-1.27), before interior tiles skipped their mask (0.42 ms in the e2e run)
    return dict(QB=max(1, 64 // block), C_TILE=64, num_warps=4, num_stages=3)


def pooled_scores(q, k, *, block_size: int, chunk_size: int, key_padding_mask=None, masked: bool = False,
                  sink_blocks: int = 0, local_blocks: int = 0):
    """``[B, Hkv, Nqb, Nkb]`` fp32 scores (-1 at non-candidates if ``masked``), as the torch backend
    (``chunk_size`` is not needed: nothing of size Nq x Nkb is stored)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    b = block_size
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
    kmean, real = pooled_keys(k, b, key_padding_mask)  # [B, Hkv, Nkb, D] in q's dtype, bool [B, Nkb]
    upcast = interpreting() and q.dtype != torch.float32
    # blocks the kernel never reaches are not candidates
    out = torch.full((B, Hkv, nqb, nkb), -1.0 if masked else 0.0, dtype=torch.float32, device=q.device)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    meta = dict(BLOCK=b, HEAD_DIM=D, GROUP=Hq // Hkv, HAS_KPM=kpm is not None, UPCAST=upcast,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", MASKED=masked,
                SINK_B=sink_blocks if masked else 0, LOCAL_B=local_blocks if masked else 0, **launch_config(b, D))
    grid = (triton.cdiv(nqb, meta["QB"]), B * Hkv)
    real = kmean if real is None else real.to(torch.int8).contiguous()  # (not read without padding)
    _pooled_kernel[grid](q, kmean, real, kpm if kpm is not None else kmean, out,
                         q.stride(0), q.stride(1), q.stride(2), kmean.stride(0), kmean.stride(1), kmean.stride(2),
                         out.stride(0), out.stride(1), out.stride(2),
                         Hkv, Nq, Nk, nqb, nkb, LOG2E / math.sqrt(D), **meta)
    return out
