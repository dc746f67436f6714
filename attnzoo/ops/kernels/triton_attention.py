"""Triton flash attention over per-head modes: dense, streaming (ranges) or block-sparse (indices).

One kernel serves the ``block_sparse`` op (every head in block mode) and the ``mixed`` op (each
head its own mode), so a routed layer runs in one launch. A program owns ``BLOCK_M`` query rows
of one query head; it walks only the key blocks its head's mode names for that query block:

- dense (0): blocks ``0 .. last visible``;
- streaming (1): blocks ``[0, ceil(sink / bk))`` and ``[lo, last visible]`` with
  ``lo = max(first query position - local, 0) // bk`` — the ``streaming`` selector's rule;
- block (2): ``kv_indices[b, h, I, :kv_counts[b, h, I]]``.

Inside a visited block the token-level rules still hold: bottom-right causal, key padding,
keys past ``Nk``. Softmax is online in fp32 (exp2 domain); the kernel returns the output and the
natural-log lse. GQA reads K/V through the KV head serving the query head (never repeated).

Backward runs two kernels. dQ is query-major like the forward: each program recomputes P for
its rows and walks the same blocks. dK/dV is key-major: each program owns BLOCK_N keys of one KV
head and walks the query blocks (of every query head it serves) whose walk visits its key
block, from ``KernelPlan.key_major`` (the walk transposed on the device). No atomics: a key
block chosen by many query blocks and heads made the earlier fp32-atomic backward 17x its
forward in router training (H100, torch.profiler of one training step).

Under ``TRITON_INTERPRET=1`` the dots are done on fp32-upcast operands: the interpreter
multiplies raw bf16 bits otherwise. Imported lazily (see ``_triton``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ... import settings
from ...caches import shape_cache
from ...plans import MODES
from ...plans.geometry import cdiv
from ._triton import interpreting, tile, tma_capable, tma_fits

# the head-mode encoding is plans.MODES' (one definition); constexpr globals so kernels may read them
MODE_DENSE = tl.constexpr(MODES.index("dense"))
MODE_STREAMING = tl.constexpr(MODES.index("streaming"))
MODE_BLOCK = tl.constexpr(MODES.index("block"))
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


@triton.jit
def _row_walk(MODE, SINK, LOCAL, IDX, CNT, b, hp, Hp, qb, m0, Nq, Nk, offset, sib, sih, siq, scb, sch, scq,
              BLOCK_M: tl.constexpr, PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr, CAUSAL: tl.constexpr):
    """What query block ``qb`` of plan head ``hp`` walks under its mode: (mode, first local block,
    sink blocks walked, number of blocks, index row, first key no row of the tile can see).
    Dense and block heads have no sink part and lo = 0."""
    mode = tl.load(MODE + b * Hp + hp)
    sink = tl.load(SINK + b * Hp + hp)
    local = tl.load(LOCAL + b * Hp + hp)
    nkb = (Nk + PLAN_BK - 1) // PLAN_BK
    if CAUSAL:
        last_row = tl.minimum((qb + 1) * PLAN_BQ, Nq) - 1
        hi = tl.minimum((last_row + offset) // PLAN_BK, nkb - 1)
        limit = tl.minimum(Nk, tl.minimum(m0 + BLOCK_M, Nq) + offset)
    else:
        hi = nkb - 1
        limit = Nk
    is_stream = mode == MODE_STREAMING
    lo_s = tl.maximum(qb * PLAN_BQ + offset - local, 0) // PLAN_BK
    lo = tl.where(is_stream, lo_s, 0)
    s_ = tl.where(is_stream, tl.minimum((sink + PLAN_BK - 1) // PLAN_BK, lo_s), 0)
    cnt = tl.load(CNT + b * scb + hp * sch + qb * scq, mask=mode == MODE_BLOCK, other=0)
    n_blocks = tl.where(mode == MODE_BLOCK, cnt, s_ + hi - lo + 1)
    return mode, lo, s_, n_blocks, IDX + b * sib + hp * sih + qb * siq, limit


@triton.jit
def _block_at(j, mode, lo, s_, idx_row, sis):
    """The j-th key block walked: an index-list entry, or a position in the sink/local ranges."""
    kb_sparse = tl.load(idx_row + j * sis, mask=mode == MODE_BLOCK, other=0)
    return tl.where(mode == MODE_BLOCK, kb_sparse, tl.where(j < s_, j, lo + j - s_))


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """The online-softmax update of rows with running max ``m_i`` and sum ``l_i`` (exp2 domain) by
    masked scores ``s`` and the tile's values ``v``: ``(acc, m, l)``. Rows with no key yet keep a
    max of -inf and add nothing."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def finish_rows(acc, m_i, l_i):
    """(output, natural-log lse) of rows after the online softmax; a row that saw no key gives 0 and -inf."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))


@triton.jit
def fwd_tile(acc, m_i, l_i, q, K, V, KPM, b, hkv, n0, offs_m, offs_n, offs_d,
              skb, skh, skn, svb, svh, svn, Nk, offset, q_first, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """One online-softmax step over keys [n0, n0 + BLOCK_N)."""
    kpos = n0 + offs_n
    if TMA:
        # K and V are [B, Hkv, Nk, D] tensor descriptors: the copy engine fetches the tile and
        # fills keys past Nk with zeros (they are masked below), so no address math per element
        kt = tl.trans(K.load([b, hkv, n0, 0]).reshape(BLOCK_N, HEAD_DIM))
        v = V.load([b, hkv, n0, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        kt = tl.load(K + b * skb + hkv * skh + kpos[None, :] * skn + offs_d[:, None],
                     mask=kpos[None, :] < Nk, other=0.0)
        v = tl.load(V + b * svb + hkv * svh + kpos[:, None] * svn + offs_d[None, :],
                    mask=kpos[:, None] < Nk, other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    needs_mask = n0 + BLOCK_N > Nk
    if CAUSAL:
        needs_mask = needs_mask | (n0 + BLOCK_N - 1 > q_first)
    if HAS_KPM:
        needs_mask = True
    if needs_mask:
        ok = kpos[None, :] < Nk
        if CAUSAL:
            ok = ok & (kpos[None, :] <= offs_m[:, None] + offset)
        if HAS_KPM:
            real = tl.load(KPM + b * Nk + kpos, mask=kpos < Nk, other=0)
            ok = ok & (real[None, :] != 0)
        s = tl.where(ok, s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, v, DOT_PREC)


@triton.jit
def _tile_order(HEADS_FIRST: tl.constexpr):
    """(query tile, batch x head) of this program, last query tiles first: under causality they
    walk the most blocks, so starting them first balances the tail. The GPU starts programs in
    the order of the grid's first axis fastest; with ``HEADS_FIRST`` (setting
    ``attention_heads_first``) that axis runs over batch x heads, so every head's last tile starts
    in the first wave. (With tiles on the first axis, head 0's tiles all start before head 1's:
    the last head's longest rows start in the last wave and run alone, which a dense row, e.g.
    XAttention's ``dense_tail``, makes long.)"""
    if HEADS_FIRST:
        return tl.num_programs(1) - 1 - tl.program_id(1), tl.program_id(0)
    return tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)


@triton.jit(do_not_specialize=["Nq", "Nk", "offset"])  # lengths: see _triton.py
def _fwd_kernel(
    Q, K, V, O, LSE, MODE, SINK, LOCAL, IDX, CNT, KPM, ROWS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    sib, sih, siq, sis, scb, sch, scq,
    Hq, Hkv, Hp, Nq, Nk, offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_CHECK: tl.constexpr, TMA: tl.constexpr,
    HEADS_FIRST: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    pid_m, pid_bh = _tile_order(HEADS_FIRST)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hp = hq // (Hq // Hp)
    hkv = hq // (Hq // Hkv)
    m0 = pid_m * BLOCK_M
    qb = m0 // PLAN_BQ
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=offs_m[:, None] < Nq, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    mode, lo, s_, n_blocks, idx_row, limit = _row_walk(
        MODE, SINK, LOCAL, IDX, CNT, b, hp, Hp, qb, m0, Nq, Nk, offset, sib, sih, siq, scb, sch, scq,
        BLOCK_M, PLAN_BQ, PLAN_BK, CAUSAL)
    if HAS_ROWS:  # a tile wholly past its head's real rows (Token Sparse's padded slots) walks nothing
        n_blocks = tl.where(m0 < tl.load(ROWS + b * Hp + hp), n_blocks, 0)
    q_first = m0 + offset

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j in range(0, n_blocks):
        kb = _block_at(j, mode, lo, s_, idx_row, sis)
        for sub in tl.static_range(PLAN_BK // BLOCK_N):
            n0 = kb * PLAN_BK + sub * BLOCK_N
            # a tile covering its whole query block sees part of every block walked (no branch,
            # so loads pipeline); a smaller tile may lie wholly before the diagonal: skip those
            if SKIP_CHECK:
                if n0 < limit:
                    acc, m_i, l_i = fwd_tile(acc, m_i, l_i, q, K, V, KPM, b, hkv, n0, offs_m, offs_n, offs_d,
                                              skb, skh, skn, svb, svh, svn, Nk, offset, q_first, qk_scale,
                                              BLOCK_N, HEAD_DIM, CAUSAL, HAS_KPM, UPCAST, DOT_PREC, TMA)
            else:
                acc, m_i, l_i = fwd_tile(acc, m_i, l_i, q, K, V, KPM, b, hkv, n0, offs_m, offs_n, offs_d,
                                          skb, skh, skn, svb, svh, svn, Nk, offset, q_first, qk_scale,
                                          BLOCK_N, HEAD_DIM, CAUSAL, HAS_KPM, UPCAST, DOT_PREC, TMA)

    out, lse = finish_rows(acc, m_i, l_i)
    row_ok = offs_m < Nq
    tl.store(O + b * sob + hq * soh + offs_m[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_rows(Q, DO, LSE, DELTA, b, hq, bh, offs_m, offs_d, row_ok, sqb, sqh, sqn, sdb, sdh, sdn, Nq,
              UPCAST: tl.constexpr):
    """What both backward kernels read for query rows ``offs_m`` of query head ``hq``: q, dO, the
    lse in the exp2 domain (+inf for rows that saw no key: P = exp2(s - inf) = 0 everywhere) and
    delta = rowsum(dO * O)."""
    q = tl.load(Q + b * sqb + hq * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + hq * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _bwd_tile(dq, q, do, lse2, delta, row_ok, K, V, KPM, DK, DV, b, hkv, kv_base, n0,
              offs_m, offs_n, offs_d, skb, skh, skn, svb, svh, svn, Nk, offset, qk_scale, sm_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PREC: tl.constexpr, ATOMIC_DKDV: tl.constexpr):
    """Recompute P for keys [n0, n0 + BLOCK_N); return dQ += dS K (and with ``ATOMIC_DKDV`` add
    this tile's dK/dV atomically; otherwise the key-major kernel computes them)."""
    kpos = n0 + offs_n
    k_ok = kpos < Nk
    k = tl.load(K + b * skb + hkv * skh + kpos[:, None] * skn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + hkv * svh + kpos[:, None] * svn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    ok = k_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        ok = ok & (kpos[None, :] <= offs_m[:, None] + offset)
    if HAS_KPM:
        real = tl.load(KPM + b * Nk + kpos, mask=k_ok, other=0)
        ok = ok & (real[None, :] != 0)
    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    if ATOMIC_DKDV:
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * sm_scale
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        ptrs = (kv_base + kpos[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(DK + ptrs, dk, mask=k_ok[:, None])
        tl.atomic_add(DV + ptrs, dv, mask=k_ok[:, None])
    return dq


@triton.jit(do_not_specialize=["Nq", "Nk", "offset"])  # lengths: see _triton.py
def _bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, MODE, SINK, LOCAL, IDX, CNT, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    sib, sih, siq, sis, scb, sch, scq,
    Hq, Hkv, Hp, Nq, Nk, offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_CHECK: tl.constexpr, ATOMIC_DKDV: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """dQ for BLOCK_M query rows of one query head (and their dK/dV share, with ``ATOMIC_DKDV``)."""
    pid_m, pid_bh = _tile_order(HEADS_FIRST)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hp = hq // (Hq // Hp)
    hkv = hq // (Hq // Hkv)
    m0 = pid_m * BLOCK_M
    qb = m0 // PLAN_BQ
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq

    q, do, lse2, delta = _bwd_rows(Q, DO, LSE, DELTA, b, hq, pid_bh, offs_m, offs_d, row_ok,
                                   sqb, sqh, sqn, sdb, sdh, sdn, Nq, UPCAST)

    mode, lo, s_, n_blocks, idx_row, limit = _row_walk(
        MODE, SINK, LOCAL, IDX, CNT, b, hp, Hp, qb, m0, Nq, Nk, offset, sib, sih, siq, scb, sch, scq,
        BLOCK_M, PLAN_BQ, PLAN_BK, CAUSAL)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    kv_base = (b * Hkv + hkv) * Nk
    for j in range(0, n_blocks):
        kb = _block_at(j, mode, lo, s_, idx_row, sis)
        for sub in tl.static_range(PLAN_BK // BLOCK_N):
            n0 = kb * PLAN_BK + sub * BLOCK_N
            if SKIP_CHECK:
                if n0 < limit:
                    dq = _bwd_tile(dq, q, do, lse2, delta, row_ok, K, V, KPM, DK, DV, b, hkv, kv_base, n0,
                                   offs_m, offs_n, offs_d, skb, skh, skn, svb, svh, svn, Nk, offset,
                                   qk_scale, sm_scale, HEAD_DIM, CAUSAL, HAS_KPM, UPCAST, DOT_PREC, ATOMIC_DKDV)
            else:
                dq = _bwd_tile(dq, q, do, lse2, delta, row_ok, K, V, KPM, DK, DV, b, hkv, kv_base, n0,
                               offs_m, offs_n, offs_d, skb, skh, skn, svb, svh, svn, Nk, offset,
                               qk_scale, sm_scale, HEAD_DIM, CAUSAL, HAS_KPM, UPCAST, DOT_PREC, ATOMIC_DKDV)

    tl.store(DQ + (pid_bh * Nq + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], dq * sm_scale,
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=["Nq", "Nk", "offset"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, TIDX, TCNT, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    stb, sth, stk, scb, sch,
    Hq, Hkv, Hp, Nq, Nk, offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PLAN_BQ: tl.constexpr, PLAN_BK: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT_HEADS: tl.constexpr, Q_SPLIT: tl.constexpr,
):
    """dK and dV for BLOCK_N keys of one KV head, summed over the query heads it serves and the
    query blocks whose walk visits this key block (the key-major plan). Unsplit, each program owns
    its rows of dK/dV and stores them. A key block every query block visits (a sink) makes one
    program walk G x nqb tiles in series; ``SPLIT_HEADS`` (one query head per program) and
    ``Q_SPLIT`` (every Q_SPLIT-th visiting query block per program) shorten that walk, and the
    programs sharing a key tile then add their sums into fp32 dK/dV, once each."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    n0 = pid_n * BLOCK_N
    kb = n0 // PLAN_BK
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ok = offs_n < Nk
    k = tl.load(K + b * skb + hkv * skh + offs_n[:, None] * skn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + hkv * svh + offs_n[:, None] * svn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    ok_k = k_ok
    if HAS_KPM:
        real = tl.load(KPM + b * Nk + offs_n, mask=k_ok, other=0)
        ok_k = ok_k & (real != 0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    G = Hq // Hkv
    g_lo = 0
    g_hi = G
    if SPLIT_HEADS:
        g_lo = pid_s // Q_SPLIT
        g_hi = g_lo + 1
    for g in range(g_lo, g_hi):
        hq = hkv * G + g
        hp = hq // (Hq // Hp)
        bh = b * Hq + hq
        cnt = tl.load(TCNT + b * scb + hp * sch + kb)
        t_row = TIDX + b * stb + hp * sth + kb * stk
        for j in range(pid_s % Q_SPLIT, cnt, Q_SPLIT):
            qb = tl.load(t_row + j)
            for sub in tl.static_range(PLAN_BQ // BLOCK_M):
                m0 = qb * PLAN_BQ + sub * BLOCK_M
                # skip row tiles past the end, or wholly above this key tile's diagonal
                live = m0 < Nq
                if CAUSAL:
                    live = live & (m0 + BLOCK_M - 1 + offset >= n0)
                if live:
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    row_ok = offs_m < Nq
                    q, do, lse2, delta = _bwd_rows(Q, DO, LSE, DELTA, b, hq, bh, offs_m, offs_d, row_ok,
                                                   sqb, sqh, sqn, sdb, sdh, sdn, Nq, UPCAST)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
                    ok = ok_k[None, :] & row_ok[:, None]
                    if CAUSAL:
                        ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
                    p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                    ds = p * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    ptrs = (pid_bh * Nk + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    if SPLIT_HEADS or Q_SPLIT > 1:
        tl.atomic_add(DK + ptrs, dk * sm_scale, mask=k_ok[:, None])
        tl.atomic_add(DV + ptrs, dv, mask=k_ok[:, None])
    else:
        tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
        tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


class KernelPlan:
    """The kernel's view of a plan: per (batch, plan head) mode, streaming ranges, and indices.

    Built by ``from_block_plan`` (every head in block mode) or by the ``mixed`` op.
    """

    def __init__(self, mode, sink, local, indices, counts, block_q, block_k, causal, rows=None):
        self.mode = mode.to(torch.int32).contiguous()
        # [B, Hp] or None: each plan head's real query rows (forward only): tiles past them walk nothing
        self.rows = None if rows is None else rows.to(torch.int32).contiguous()
        self.sink = sink.to(torch.int32).contiguous()
        self.local = local.to(torch.int32).contiguous()
        self.indices = indices.to(torch.int32)
        self.counts = counts.to(torch.int32)
        self.block_q, self.block_k, self.causal = block_q, block_k, causal

    @property
    def heads(self) -> int:
        return self.mode.shape[1]

    # block-mask entries (batch x plan head x nqb x nkb) transposed at once; larger walks go in
    # slices of plan heads, since the transient tensors take ~10 bytes per entry (argsort's int64)
    KEY_MAJOR_ENTRIES = 1 << 25

    def key_major(self, q_len: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The walk transposed, for the backward's dK/dV: per (batch, plan head, key block), the
        query blocks whose walk visits it, ascending (``[B, Hp, nkb, nqb]`` int32, the first
        ``counts [B, Hp, nkb]`` valid). Built on the device from the per-head modes through a
        block-level mask (blocks, not tokens: ``nqb x nkb`` per head), with no host sync."""
        B, Hp = self.mode.shape
        bq, bk, dev = self.block_q, self.block_k, self.mode.device
        nqb, nkb, offset = cdiv(q_len, bq), cdiv(kv_len, bk), kv_len - q_len
        qb = torch.arange(nqb, device=dev)[:, None]
        kb = torch.arange(nkb, device=dev)
        if self.causal:  # the last visible key block of each query block (as _row_walk)
            hi = ((torch.clamp((qb + 1) * bq, max=q_len) - 1 + offset) // bk).clamp(max=nkb - 1)
        else:
            hi = torch.full_like(qb, nkb - 1)
        visible = kb <= hi  # [nqb, nkb]
        rows = B * Hp
        flat = [t.reshape(rows, *t.shape[2:]) for t in (self.mode, self.sink, self.local, self.indices, self.counts)]
        order = torch.empty((rows, nkb, nqb), dtype=torch.int32, device=dev)
        counts = torch.empty((rows, nkb), dtype=torch.int32, device=dev)
        step = max(1, self.KEY_MAJOR_ENTRIES // (nqb * nkb))
        for r0 in range(0, rows, step):
            mode, sink, local, indices, cnt = (t[r0:r0 + step] for t in flat)
            sink, local = sink[:, None, None].long(), local[:, None, None].long()
            lo = torch.clamp(qb * bq + offset - local, min=0) // bk  # [rows, nqb, 1]
            stream = visible & ((kb < torch.minimum((sink + bk - 1) // bk, lo)) | (kb >= lo))
            listed = torch.arange(indices.shape[-1], device=dev) < cnt[..., None]
            idx = torch.where(listed, indices.long(), nkb)  # unlisted entries land in a spare column
            block = torch.zeros((*idx.shape[:2], nkb + 1), dtype=torch.bool, device=dev).scatter_(-1, idx, True)
            mode = mode[:, None, None]
            walked = torch.where(mode == MODE_DENSE.value, visible,
                                 torch.where(mode == MODE_STREAMING.value, stream, block[..., :nkb]))
            by_key = walked.transpose(-1, -2)  # [rows, nkb, nqb]
            counts[r0:r0 + step] = by_key.sum(-1, dtype=torch.int32)
            order[r0:r0 + step] = torch.argsort((~by_key).to(torch.uint8), dim=-1, stable=True)  # visited first
        # contiguous: the kernel steps the last dim by 1
        return order.view(B, Hp, nkb, nqb), counts.view(B, Hp, nkb)

    @classmethod
    def from_block_plan(cls, plan) -> KernelPlan:
        B, H = plan.kv_counts.shape[:2]
        dev = plan.kv_counts.device
        mode = torch.full((B, H), MODE_BLOCK.value, dtype=torch.int32, device=dev)
        zero = torch.zeros((B, H), dtype=torch.int32, device=dev)
        return cls(mode, zero, zero, plan.kv_indices, plan.kv_counts, plan.block_q, plan.block_k,
                   plan.causal)

    @classmethod
    def dense(cls, batch: int, heads: int, q_len: int, causal: bool, device, rows=None) -> KernelPlan:
        """Every head dense (walks every visible block; the tile size is the kernel's own).
        ``rows`` ``[batch, heads]``: each head's real query rows (the tiles past them are skipped)."""
        mode = torch.full((batch, heads), MODE_DENSE.value, dtype=torch.int32, device=device)
        nqb = cdiv(q_len, 128)
        cnt = torch.zeros((batch, heads, nqb), dtype=torch.int32, device=device)
        return cls(mode, mode, mode, cnt[..., None], cnt, 128, 128, causal, rows)

    @classmethod
    def from_mixed_plan(cls, plan) -> KernelPlan:
        if plan.block is not None:
            idx, cnt = plan.block.kv_indices, plan.block.kv_counts
        else:  # no block-mode head: a placeholder the kernel never reads
            nqb = cdiv(plan.q_len, plan.block_size)
            cnt = torch.zeros((*plan.mode.shape, nqb), dtype=torch.int32, device=plan.mode.device)
            idx = cnt[..., None]
        return cls(plan.mode, plan.sink, plan.local, idx, cnt, plan.block_size, plan.block_size,
                   plan.causal)


def _tile_or_raise(block: int, cap: int, name: str) -> int:
    t = tile(block, cap)
    if t is None:
        raise ValueError(f"the Triton kernel needs block sizes divisible by 16, got {name}={block}")
    return t


# Forward K/V through TMA tensor descriptors: settings ``attention_tma`` (auto = wherever they can
# run: Hopper or newer, not under the interpreter); tests force it on under the interpreter.


def launch_config(head_dim: int, block_m: int, backward: bool) -> dict:
    """Warps, pipeline stages, key tile (``BLOCK_N`` cap) and TMA on a GPU (a module-level
    function: ``bench/gpu/tune.py`` swaps it). From the H100 sweep (``bash bench/gpu/hotpath.sh
    tune``), forward:

    - 16-row tiles (16-token query blocks, e.g. top-k blocks): 2 warps (0.42 ms against 0.77 on 4
      for a top-16 plan at 32K);
    - 64-row tiles: 4 warps, 3 stages at both head dims; at D 128 the old 8 warps took
      over 36 ms against 19.0 for a 64-token plan at density 0.25 (64K, 32/8 heads); K/V through TMA there
      (19.0 against 20.7 ms), pointer loads at D 64 (equal within 3 %, pointers ahead);
    - 128-row tiles: 128-key tiles through TMA, 8 warps at D 128 (dense 67.6 ms = 521 TFLOP/s
      against 77.6 with the old 64-key pointer tiles), 4 at D 64.

    TMA is used only where the device has it (Hopper or newer) and the layout allows it."""
    if backward:  # SPLIT_HEADS / Q_SPLIT: the key-major dK/dV walk split (see _bwd_dkdv_kernel); off:
        # in one H200 run it was at most 8 % faster (16K) and slower elsewhere; in another split-heads
        # took 16K / 0.2 from 3.48 to 2.43 ms, little at 4K or 32K. Two runs disagree on the one shape
        # it helps, so it stays off; bench/gpu/backward.py times it
        return dict(num_warps=8 if head_dim > 64 else 4, num_stages=3 if head_dim > 64 else 2,
                    SPLIT_HEADS=False, Q_SPLIT=1)
    if block_m <= 16:
        return dict(num_warps=2, num_stages=2)
    if block_m <= 64:
        return dict(num_warps=4, num_stages=3, TMA=head_dim > 64)
    return dict(num_warps=8 if head_dim > 64 else 4, num_stages=3, BLOCK_N=128, TMA=True)


# Query-major kernels' program order (see _tile_order), settings ``attention_heads_first``: on = heads
# on the grid's first axis, so every head's longest (last) query tiles start first; off = query tiles
# first (bench/gpu/tail_balance.py times both).
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis


def _grid(tiles: int, heads: int, heads_first: bool) -> tuple[int, int]:
    grid = (heads, tiles) if heads_first else (tiles, heads)
    if grid[1] > _MAX_GRID_Y:
        what = f"{tiles} query tiles" if heads_first else f"{heads} batch x heads"
        raise ValueError(f"the Triton block-sparse kernel launches at most {_MAX_GRID_Y} programs on its "
                         f"second grid axis; this call needs {what}")
    return grid


def _common(q, k, v, kp: KernelPlan, key_padding_mask, backward=False):
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    # forward: 128-row tiles (one per 128-token query block, no skip branch); backward keeps
    # q, dO, K, V tiles and dK/dV partials on chip, so it needs the 64-row tile at D = 128
    bm = _tile_or_raise(kp.block_q, 64 if interpreting() or backward else 128, "block_q")
    cfg = {} if interpreting() else dict(launch_config(D, bm, backward))
    bn = _tile_or_raise(kp.block_k, cfg.pop("BLOCK_N", 64), "block_k")
    tma = cfg.pop("TMA", None)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    upcast = interpreting() and q.dtype != torch.float32
    meta = dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, PLAN_BQ=kp.block_q, PLAN_BK=kp.block_k,
                CAUSAL=kp.causal, HAS_KPM=kpm is not None, UPCAST=upcast,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", SKIP_CHECK=bm < kp.block_q, **cfg)
    if not backward:  # the config may decline TMA; it never forces it where it cannot run
        meta["TMA"] = tma_capable(q.device, settings.get("attention_tma")) and tma is not False and tma_fits(k, v)
    meta["HEADS_FIRST"] = settings.get("attention_heads_first")
    grid = lambda m: _grid(triton.cdiv(Nq, m["BLOCK_M"]), B * Hq, m["HEADS_FIRST"])  # noqa: E731
    plan_args = (kp.mode, kp.sink, kp.local, kp.indices, kp.counts, kpm if kpm is not None else kp.mode)
    plan_strides = (*kp.indices.stride(), *kp.counts.stride())
    sizes = (Hq, k.shape[1], kp.heads, Nq, Nk, Nk - Nq)
    return grid, meta, plan_args, plan_strides, sizes


def _launch(kernel, grid, meta, *args):
    """Launch; if the tile does not fit in shared memory on this GPU, halve the query tile."""
    while True:
        try:
            return kernel[grid](*args, **meta)
        except triton.runtime.errors.OutOfResources:
            if meta["BLOCK_M"] <= 16:
                raise
            bm = meta["BLOCK_M"] // 2
            meta = {**meta, "BLOCK_M": bm, "num_stages": 2}
            if "SKIP_CHECK" in meta:  # the query-major kernels: a tile now smaller than its query block
                meta["SKIP_CHECK"] = bm < meta["PLAN_BQ"]


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def forward(q, k, v, kp: KernelPlan, key_padding_mask, scale):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, Hq, Nq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    grid, meta, plan_args, plan_strides, sizes = _common(q, k, v, kp, key_padding_mask)
    kd, vd = k, v
    if meta["TMA"]:
        kd, vd = (TensorDescriptor.from_tensor(t, [1, 1, meta["BLOCK_N"], D]) for t in (k, v))
    meta["HAS_ROWS"] = kp.rows is not None
    _launch(_fwd_kernel, grid, meta,
            q, kd, vd, out, lse, *plan_args, kp.rows if kp.rows is not None else kp.mode,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *plan_strides, *sizes, scale * LOG2E)
    return out, lse


# Backward dK/dV: True = the key-major kernel over the transposed walk (each program owns its
# keys); False = fp32 atomics from the query-major dQ kernel; None = by the key-major grid:
# with fewer than KEY_MAJOR_MIN_PROGRAMS_PER_SM programs (key tiles x batch x KV heads) per SM its
# long column walks have too little to overlap with, and the atomic kernel measured faster. H200,
# batch 1, 9/3 heads, D 64, density 0.2 / 0.5 (bench/gpu/backward.py):
# 4K = 192 programs, 1.5 per SM: atomics 1.00 / 1.42 ms, key-major 1.76 / 2.29; 16K = 5.8 per SM:
# key-major 3.24 / 3.46, atomics 3.89 / 8.09; 32K, 32/8 heads, D 128 = 31 per SM: 42.0 / 89.6
# against 88.6 / 205.5. 2 lies between the measured points (8K, 2.9 per SM, was not measured).
# settings ``attention_key_major_backward`` forces either kernel.
KEY_MAJOR_MIN_PROGRAMS_PER_SM = 2
# settings ``attention_backward_split``: (SPLIT_HEADS, Q_SPLIT) for the key-major kernel, overriding
# launch_config's: tests force the split under the interpreter (which takes no launch config)


@shape_cache(8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def use_key_major(q, programs: int) -> bool:
    """Whether the dK/dV gradients take the key-major kernel (``programs``: its unsplit grid)."""
    forced = settings.get("attention_key_major_backward")
    if forced is not None:
        return forced
    if interpreting() or not q.is_cuda:  # no SMs to fill: the key-major kernel, as tested
        return True
    return programs >= KEY_MAJOR_MIN_PROGRAMS_PER_SM * _sm_count(q.device)


def backward(q, k, v, out, lse, dout, dlse, kp: KernelPlan, key_padding_mask, scale):
    if kp.rows is not None:  # skipped rows hold lse = -inf: their gradient is not defined
        raise NotImplementedError("the Triton kernel's row lengths (KernelPlan.rows) are forward-only")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dout = dout.contiguous()
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O), minus the lse gradient
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq = torch.empty((B, Hq, Nq, D), dtype=torch.float32, device=q.device)
    grid, meta, plan_args, plan_strides, sizes = _common(q, k, v, kp, key_padding_mask, backward=True)
    split = (meta.pop("SPLIT_HEADS", False), meta.pop("Q_SPLIT", 1))
    if settings.get("attention_backward_split") is not None:
        split = settings.get("attention_backward_split")
    atomic = not use_key_major(q, triton.cdiv(Nk, meta["BLOCK_N"]) * B * k.shape[1])
    summed = atomic or split[0] or split[1] > 1  # dK/dV added into fp32, zeros first
    kv_dtype = torch.float32 if summed else k.dtype
    dk = (torch.zeros if summed else torch.empty)(k.shape, dtype=kv_dtype, device=q.device)
    dv = (torch.zeros if summed else torch.empty)(v.shape, dtype=kv_dtype, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _launch(_bwd_kernel, grid, {**meta, "ATOMIC_DKDV": atomic},
            q, k, v, dout, lse, delta, dq, dk, dv, *plan_args, *strides,
            *plan_strides, *sizes, scale * LOG2E, scale)
    if not atomic:
        t_idx, t_cnt = kp.key_major(Nq, Nk)
        programs = (Hq // k.shape[1] if split[0] else 1) * split[1]
        meta = {**{name: val for name, val in meta.items() if name not in ("SKIP_CHECK", "HEADS_FIRST")},
                "SPLIT_HEADS": split[0], "Q_SPLIT": split[1]}
        _launch(_bwd_dkdv_kernel, lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * k.shape[1], programs), meta,
                q, k, v, dout, lse, delta, dk, dv, t_idx, t_cnt, plan_args[-1], *strides,
                t_idx.stride(0), t_idx.stride(1), t_idx.stride(2), t_cnt.stride(0), t_cnt.stride(1),
                *sizes, scale * LOG2E, scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kp, key_padding_mask, scale):
        out, lse = forward(q, k, v, kp, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kp, ctx.kpm, ctx.scale = kp, key_padding_mask, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = backward(q, k, v, out, lse, dout, dlse, ctx.kp, ctx.kpm, ctx.scale)
        return dq, dk, dv, None, None, None


def attention(q, k, v, kp: KernelPlan, key_padding_mask, scale):
    """(out, lse) for q ``[B, Hq, Nq, D]`` and k/v ``[B, Hkv, Nk, D]`` under ``kp``."""
    return _TritonAttention.apply(q, k, v, kp, key_padding_mask, scale)
