"""Triton block-sparse prefill for plans shared by each GQA group: the group's query heads in one tile.

A plan made per KV head (``plans.heads == Hkv < Hq``: top-k blocks sums its scores over the group,
XAttention with ``per_kv_head``) sends every query head of a group down the same key blocks. The
``triton`` kernel still runs one program per (query head, query block): with 16-token query
blocks each program multiplies a 16-row tile by every 16-key block it walks, and each K/V block is
read once per query head. Here a program owns one query block of one KV head and stacks the
group's heads into one tile (``GROUP x block_q`` rows, padded to a power of two): each K/V block
is read once per group and the dots are ``GROUP`` times taller.

Forward only (the ``triton`` backend serves gradients); causal bottom-right, key padding and keys
past ``Nk`` and the fp32 online softmax are ``triton_attention``'s (its ``fwd_tile``, rows at their positions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting
from .triton_attention import LOG2E, finish_rows, fwd_tile


@triton.jit(do_not_specialize=["Nq", "Nk", "offset"])  # lengths: see _triton.py
def _grouped_fwd_kernel(
    Q, K, V, O, LSE, IDX, CNT, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    sib, sih, siq, sis, scb, sch, scq,
    Hq, Hkv, Nq, Nk, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    qb = tl.num_programs(0) - 1 - tl.program_id(0)  # last query blocks (the longest walks) first
    pid = tl.program_id(1)
    b = pid // Hkv
    hkv = pid % Hkv
    r = tl.arange(0, BLOCK_M)
    hq = hkv * GROUP + r // BQ  # tile row r: query head r // BQ of the group, query row r % BQ of the block
    row = qb * BQ + r % BQ
    row_ok = (r < GROUP * BQ) & (row < Nq)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BK)
    q = tl.load(Q + b * sqb + hq[:, None] * sqh + row[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    n_blocks = tl.load(CNT + b * scb + hkv * sch + qb * scq)
    idx_row = IDX + b * sib + hkv * sih + qb * siq
    first_q = qb * BQ + offset  # the block's first query position: keys up to it are seen by every row
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j in range(0, n_blocks):  # the tile's rows stand at positions ``row`` (the causal rule's rows)
        n0 = tl.load(idx_row + j * sis) * BK
        acc, m_i, l_i = fwd_tile(acc, m_i, l_i, q, K, V, KPM, b, hkv, n0, row, offs_n, offs_d,
                                  skb, skh, skn, svb, svh, svn, Nk, offset, first_q, qk_scale,
                                  BK, HEAD_DIM, CAUSAL, HAS_KPM, UPCAST, DOT_PREC, False)
    out, lse = finish_rows(acc, m_i, l_i)
    tl.store(O + b * sob + hq[:, None] * soh + row[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + (b * Hq + hq) * Nq + row, lse, mask=row_ok)


def tile_rows(group: int, block_q: int) -> int:
    """Rows of a program's tile: the group's query rows, padded to a power of two (>= 16)."""
    return max(16, triton.next_power_of_2(group * block_q))


def launch_config(rows: int) -> dict:
    """Warps and stages on a GPU: one warp group per 64 rows (not yet swept on a GPU)."""
    if interpreting():
        return {}
    return dict(num_warps=4 if rows <= 64 else 8, num_stages=2)


def forward(q, k, v, plan, key_padding_mask, scale):
    """(out, lse) of the block plan ``plan`` (``plan.heads == Hkv``) for q ``[B, Hq, Nq, D]``, k/v
    ``[B, Hkv, Nk, D]``."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group, bq, bk = Hq // Hkv, plan.block_q, plan.block_k
    rows = tile_rows(group, bq)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    idx, cnt = plan.kv_indices.to(torch.int32), plan.kv_counts.to(torch.int32)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    meta = dict(HEAD_DIM=D, BQ=bq, BK=bk, GROUP=group, BLOCK_M=rows, CAUSAL=plan.causal, HAS_KPM=kpm is not None,
                UPCAST=interpreting() and q.dtype != torch.float32,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", **launch_config(rows))
    _grouped_fwd_kernel[(triton.cdiv(Nq, bq), B * Hkv)](
        q, k, v, out, lse, idx, cnt, kpm if kpm is not None else cnt,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *idx.stride(), *cnt.stride(), Hq, Hkv, Nq, Nk, Nk - Nq, scale * LOG2E, **meta)
    return out, lse
