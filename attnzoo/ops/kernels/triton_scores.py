"""Triton XAttention scoring: strided antidiagonal scores, softmax and block sums in one kernel.

Same definition as the torch backend (``attnzoo.ops.antidiagonal``): reduced query row i is
``concat_t Q[iS + S-1-t]``, reduced key j is ``concat_t K[jS + t]``; scores scaled by
1/(sqrt(D) S), causal in reduced units with the bottom-right shift, softmax per reduced row,
then summed over each (query block, key block) cell. A program owns a few consecutive query
blocks of one query head (tiles tall enough for the tensor cores): pass 1 finds each reduced
row's max and sum over its causally reachable reduced keys, pass 2 recomputes the scores and adds
normalised probabilities into per-key-block sums. The reduced
score matrix is never stored; the product runs as S dots of [r, D] x [D, C] per tile.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import interpreting

LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _scores_tile(Q, K, KPM, q_base, k_base, b, rows, cols, Nq, Nk, offset, sqn, skn,
                 S: tl.constexpr, HEAD_DIM: tl.constexpr, R_TILE: tl.constexpr, C_TILE: tl.constexpr,
                 HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    s = tl.zeros([R_TILE, C_TILE], tl.float32)
    for t in range(S):  # a loop, not unrolled: one [R, D] and one [D, C] tile in shared memory
        qpos = rows * S + (S - 1 - t)
        kpos = cols * S + t
        q_ok = qpos < Nq
        k_ok = kpos < Nk
        if HAS_KPM:
            q_ok = q_ok & (tl.load(KPM + b * Nk + qpos + offset, mask=q_ok, other=0) != 0)
            k_ok = k_ok & (tl.load(KPM + b * Nk + kpos, mask=k_ok, other=0) != 0)
        q = tl.load(Q + q_base + qpos[:, None] * sqn + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        kt = tl.load(K + k_base + kpos[None, :] * skn + offs_d[:, None], mask=k_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            kt = kt.to(tl.float32)
        s += tl.dot(q, kt, input_precision=DOT_PREC)
    return s


@triton.jit
def _row_col_ok(KPM, b, rows, cols, Nq, Nk, offset, shift, S: tl.constexpr, HAS_KPM: tl.constexpr):
    """Which reduced rows vote and which reduced keys exist (at least one real position)."""
    row_ok = rows * S < Nq
    col_ok = cols * S < Nk
    if HAS_KPM:
        r_any = tl.zeros(rows.shape, tl.int32)
        c_any = tl.zeros(cols.shape, tl.int32)
        for t in tl.static_range(S):
            qpos = rows * S + t
            kpos = cols * S + t
            r_any += tl.load(KPM + b * Nk + qpos + offset, mask=qpos < Nq, other=0).to(tl.int32)
            c_any += tl.load(KPM + b * Nk + kpos, mask=kpos < Nk, other=0).to(tl.int32)
        row_ok = row_ok & (r_any > 0)
        col_ok = col_ok & (c_any > 0)
    ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None] + shift)
    return ok


@triton.jit
def _scores_kernel(
    Q, K, KPM, W,
    sqb, sqh, sqn, skb, skh, skn, swb, swh, swi,
    Hq, Hkv, Nq, Nk, I0, I1, nkb, qk_scale,
    S: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, QB: tl.constexpr,
    C_TILE: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # QB query blocks (QB * R reduced rows) per program: taller tiles keep the tensor cores fed
    R_TILE: tl.constexpr = QB * R
    I = I0 + tl.program_id(0) * QB
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hkv = hq // (Hq // Hkv)
    offset = Nk - Nq
    shift = (offset + S - 1) // S  # bottom-right alignment in reduced units
    rows = I * R + tl.arange(0, R_TILE)
    row_in = rows < I1 * R
    q_base = b * sqb + hq * sqh
    k_base = b * skb + hkv * skh
    # reduced keys right of the last block's last reduced diagonal are all masked
    ncol = tl.minimum(nkb * R, tl.minimum(I + QB, I1) * R + shift)

    m_i = tl.full([R_TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([R_TILE], tl.float32)
    for c0 in range(0, ncol, C_TILE):
        cols = c0 + tl.arange(0, C_TILE)
        s = _scores_tile(Q, K, KPM, q_base, k_base, b, rows, cols, Nq, Nk, offset, sqn, skn,
                         S, HEAD_DIM, R_TILE, C_TILE, HAS_KPM, UPCAST, DOT_PREC) * qk_scale
        ok = _row_col_ok(KPM, b, rows, cols, Nq, Nk, offset, shift, S, HAS_KPM) & row_in[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    qi = (I - I0) + tl.arange(0, QB)
    w_rows = W + b * swb + hq * swh + qi * swi
    for c0 in range(0, ncol, C_TILE):
        cols = c0 + tl.arange(0, C_TILE)
        s = _scores_tile(Q, K, KPM, q_base, k_base, b, rows, cols, Nq, Nk, offset, sqn, skn,
                         S, HEAD_DIM, R_TILE, C_TILE, HAS_KPM, UPCAST, DOT_PREC) * qk_scale
        ok = _row_col_ok(KPM, b, rows, cols, Nq, Nk, offset, shift, S, HAS_KPM) & row_in[:, None]
        p = tl.where(ok, tl.exp2(s - m_safe[:, None]) * inv_l[:, None], 0.0)
        # [QB*R, C] -> per (query block, key block) sums [QB, C/R]
        p4 = tl.reshape(p, [QB, R, C_TILE // R, R])
        blocks = tl.sum(tl.sum(p4, 3), 1)
        J = c0 // R + tl.arange(0, C_TILE // R)
        tl.store(w_rows[:, None] + J[None, :], blocks, mask=(qi[:, None] < I1 - I0) & (J[None, :] < nkb))


def block_scores(q, k, *, stride: int, block_size: int, chunk_size: int, key_padding_mask=None):
    """Yield ``(I0, I1, W)`` like the torch backend: W ``[B, Hq, I1-I0, Nkb]`` fp32."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    S, b = stride, block_size
    R = b // S
    nqb, nkb = -(-Nq // b), -(-Nk // b)
    qb_per_prog = max(1, (16 if interpreting() else 64) // R)  # >= 16 (interpreter) / 64 reduced rows
    c_tile = max(R, 16 if interpreting() else 64)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    meta = dict(S=S, R=R, HEAD_DIM=D, QB=qb_per_prog, C_TILE=c_tile, HAS_KPM=kpm is not None,
                UPCAST=interpreting() and q.dtype != torch.float32,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if not interpreting():
        meta.update(num_warps=4, num_stages=2 if D <= 128 else 1)
    # the score matrix is block level ([B, Hq, Nqb, Nkb] fp32, 37 MB at 64K tokens, 9 heads, b = 64):
    # on a GPU all query blocks go in one launch; the interpreter keeps the caller's chunks
    step = chunk_size // b if interpreting() else nqb
    scale = 1.0 / (math.sqrt(D) * S)
    for I0 in range(0, nqb, step):
        I1 = min(nqb, I0 + step)
        w = torch.zeros((B, Hq, I1 - I0, nkb), dtype=torch.float32, device=q.device)
        args = (q, k, kpm if kpm is not None else w, w,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                w.stride(0), w.stride(1), w.stride(2), Hq, Hkv, Nq, Nk, I0, I1, nkb, scale * LOG2E)
        while True:
            try:
                _scores_kernel[(triton.cdiv(I1 - I0, meta["QB"]), B * Hq)](*args, **meta)
                break
            except triton.runtime.errors.OutOfResources:  # smaller tiles for this GPU
                if meta["QB"] * R <= 16 and meta["C_TILE"] <= max(R, 16):
                    raise
                meta = {**meta, "QB": max(1, meta["QB"] // 2), "C_TILE": max(R, 16, meta["C_TILE"] // 2),
                        "num_stages": 1}
        yield I0, I1, w
