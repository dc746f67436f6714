"""Split-K block-sparse decode: one query per (sequence, head) against the key blocks its plan row
names, the blocks shared out over several programs (flash-decoding over a sparse plan).

A decode step has one query row per head: the prefill kernel's grid (one program per query block
and head) is B x Hq programs, 9 for the embedded model at batch 1, each walking every selected
block in turn while most of the GPU idles. Here program (b, h, s) walks the s-th share of row
(b, h)'s blocks and writes a partial output with its running max and sum (fp32, exp2 domain); a
second kernel merges the shares of each row. The query is a vector, so scores are a
multiply-and-sum over the block's keys (no tensor-core tile for one row). GQA reads each key
block through the KV head that serves the query head; the plan may be per query head or per KV
head; any strides (a strided head dim included). Key padding and keys past ``Nk`` are masked;
a decode query sees every key before it, so
there is no causal mask. A plan per KV head (a GQA group sharing its blocks, e.g. Quest's
``per_kv_head``) takes a second kernel that reads each block once for the whole group, the group's
query rows padded to a tensor-core tile (on an H100 a 128K cache, 32/8 heads, a 4K budget: the
per-head kernel read the blocks four times over). Imported lazily (see ``_triton``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import interpreting, tile
from .triton_attention import softmax_step

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
MAX_SPLITS = 64


@triton.jit
def _tile_keys(KPM, b, kpos, Nk, HAS_KPM: tl.constexpr):
    """A key tile's positions and which of them exist and are real (not past Nk, not padding)."""
    ok = kpos < Nk
    if HAS_KPM:
        ok = ok & (tl.load(KPM + b * Nk + kpos, mask=ok, other=0) != 0)
    return kpos, ok


@triton.jit(do_not_specialize=["Nk", "per_split", "n_splits"])
def _split_kernel(Q, K, V, KPM, IDX, CNT, OP, MP, LP,
                  sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sib, sih, scb, sch,
                  Hq, g_plan, g_kv, Nk, per_split, n_splits, qk_scale,
                  BK: tl.constexpr, TK: tl.constexpr, D: tl.constexpr, HAS_KPM: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hp = h // g_plan
    hkv = h // g_kv
    cnt = tl.load(CNT + b * scb + hp * sch)
    j0 = s * per_split
    j1 = tl.minimum(j0 + per_split, cnt)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, TK)
    q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd).to(tl.float32) * qk_scale
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for j in range(j0, j1):
        blk = tl.load(IDX + b * sib + hp * sih + j)
        for t in range(0, BK // TK):
            kpos, ok = _tile_keys(KPM, b, blk * BK + t * TK + offs_n, Nk, HAS_KPM)
            k = tl.load(K + b * skb + hkv * skh + kpos[:, None] * skn + offs_d[None, :] * skd, mask=ok[:, None],
                        other=0.0)
            v = tl.load(V + b * svb + hkv * svh + kpos[:, None] * svn + offs_d[None, :] * svd, mask=ok[:, None],
                        other=0.0)
            sc = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
    part = bh * n_splits + s
    tl.store(OP + part * D + offs_d, acc)
    tl.store(MP + part, m_i)
    tl.store(LP + part, l_i)


@triton.jit(do_not_specialize=["Nk", "per_split", "n_splits"])
def _group_split_kernel(Q, K, V, KPM, IDX, CNT, OP, MP, LP,
                        sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sib, sih, scb, sch,
                        Hkv, G, Nk, per_split, n_splits, qk_scale,
                        BK: tl.constexpr, TK: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                        HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """A plan per KV head: program (b * Hkv + hkv, s) reads each key block of its share once for
    the group's G query rows (padded to GP >= 16 rows for the tensor-core dot), where the per-head
    kernel reads it G times."""
    bh = tl.program_id(0)
    s = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    cnt = tl.load(CNT + b * scb + hkv * sch)
    j0 = s * per_split
    j1 = tl.minimum(j0 + per_split, cnt)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, TK)
    rows = tl.arange(0, GP)
    live = rows < G
    q = tl.load(Q + b * sqb + (hkv * G + rows)[:, None] * sqh + offs_d[None, :] * sqd, mask=live[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for j in range(j0, j1):
        blk = tl.load(IDX + b * sib + hkv * sih + j)
        for t in range(0, BK // TK):
            kpos, ok = _tile_keys(KPM, b, blk * BK + t * TK + offs_n, Nk, HAS_KPM)
            kt = tl.load(K + b * skb + hkv * skh + kpos[None, :] * skn + offs_d[:, None] * skd, mask=ok[None, :],
                         other=0.0)
            v = tl.load(V + b * svb + hkv * svh + kpos[:, None] * svn + offs_d[None, :] * svd, mask=ok[:, None],
                        other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            sc = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
            sc = tl.where(ok[None, :], sc, float("-inf"))
            acc, m_i, l_i = softmax_step(acc, m_i, l_i, sc, v, DOT_PREC)
    part = (b * Hkv * G + hkv * G + rows) * n_splits + s  # the per-head kernel's layout: (b, h, s)
    tl.store(OP + part[:, None] * D + offs_d[None, :], acc, mask=live[:, None])
    tl.store(MP + part, m_i, mask=live)
    tl.store(LP + part, l_i, mask=live)


@triton.jit(do_not_specialize=["n_splits"])
def _merge_kernel(OP, MP, LP, O, LSE, n_splits, sob, soh, Hq,
                  SPLITS: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, D)
    live = offs_s < n_splits
    m = tl.load(MP + bh * n_splits + offs_s, mask=live, other=float("-inf"))
    l_ = tl.load(LP + bh * n_splits + offs_s, mask=live, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(live, tl.exp2(m - m_safe), 0.0)
    total = tl.sum(w * l_, 0)
    parts = tl.load(OP + (bh * n_splits + offs_s)[:, None] * D + offs_d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    b = bh // Hq
    h = bh % Hq
    tl.store(O + b * sob + h * soh + offs_d, out.to(O.dtype.element_ty))
    tl.store(LSE + bh, tl.where(total > 0, (m_safe + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453,
                                float("-inf")))


def splits_for(rows: int, max_blocks: int, device: torch.device) -> int:
    """Shares per row: enough programs to fill the GPU (~4 per SM), never more than its blocks."""
    if interpreting() or device.type != "cuda":
        want = 3  # a few shares per row, so tests run the merge with several of them
    else:
        want = -(-4 * torch.cuda.get_device_properties(device).multi_processor_count // max(rows, 1))
    return max(1, min(MAX_SPLITS, max_blocks, want))


def decode(q, k, v, kv_indices, kv_counts, block_k: int, key_padding_mask, scale):
    """``q`` ``[B, Hq, 1, D]``; ``kv_indices`` ``[B, Hp, 1, Kmax]``, ``kv_counts`` ``[B, Hp, 1]``
    (Hp = Hq or Hkv). Returns out ``[B, Hq, 1, D]`` (q's dtype) and lse ``[B, Hq, 1]`` (fp32)."""
    B, Hq, _, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    Hp, kmax = kv_indices.shape[1], kv_indices.shape[3]
    grouped = Hp == Hkv < Hq  # one plan row per GQA group: read each block once for the group
    n_splits = splits_for(B * (Hkv if grouped else Hq), kmax, q.device)
    per_split = -(-kmax // n_splits)
    n_splits = -(-kmax // per_split) if kmax else 1
    dev = q.device
    o_part = torch.empty(B * Hq * n_splits, D, dtype=torch.float32, device=dev)
    m_part = torch.empty(B * Hq * n_splits, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    idx = kv_indices[:, :, 0].contiguous()  # the kernel walks a row with unit stride
    cnt = kv_counts[:, :, 0]
    kpm = key_padding_mask.to(torch.int8) if key_padding_mask is not None else q
    strides = (q.stride(0), q.stride(1), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
               v.stride(0), v.stride(1), v.stride(2), v.stride(3),
               idx.stride(0), idx.stride(1), cnt.stride(0), cnt.stride(1))
    if grouped:
        _group_split_kernel[(B * Hkv, n_splits)](
            q, k, v, kpm, idx, cnt, o_part, m_part, l_part, *strides,
            Hkv, Hq // Hkv, Nk, per_split, n_splits, scale * LOG2E,
            BK=block_k, TK=tile(block_k), D=D, GP=max(16, triton.next_power_of_2(Hq // Hkv)),
            HAS_KPM=key_padding_mask is not None, UPCAST=interpreting(),
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    else:
        _split_kernel[(B * Hq, n_splits)](
            q, k, v, kpm, idx, cnt, o_part, m_part, l_part, *strides,
            Hq, Hq // Hp, Hq // Hkv, Nk, per_split, n_splits, scale * LOG2E,
            BK=block_k, TK=tile(block_k), D=D, HAS_KPM=key_padding_mask is not None)
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, 1, dtype=torch.float32, device=dev)
    _merge_kernel[(B * Hq,)](o_part, m_part, l_part, out, lse, n_splits, out.stride(0), out.stride(1), Hq,
                             SPLITS=triton.next_power_of_2(n_splits), D=D)
    return out, lse
