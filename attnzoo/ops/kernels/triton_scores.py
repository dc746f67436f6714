"""Triton XAttention scoring: strided antidiagonal scores, softmax and block sums in one pass.

Same definition as the torch backend (``attnzoo.ops.antidiagonal``): reduced query row i is
``concat_t Q[iS + S-1-t]``, reduced key j is ``concat_t K[jS + t]``; scores scaled by
1/(sqrt(D) S), causal in reduced units with the bottom-right shift, softmax per reduced row,
then summed over each (query block, key block) cell.

A program owns a few consecutive query blocks of one query head (``R_TILE`` reduced rows, tall
enough for the tensor cores). Each column tile is one ``[R_TILE, S*D] x [S*D, C_TILE]`` product (K~
rows are S consecutive keys, so a K~ tile is a plain strided load): either with the reduced query
tile resident in registers (``Q_RESIDENT``, small S*D), or streamed as S steps of ``[R_TILE, D] x
[D, C_TILE]`` (the GPU default; ``launch_config`` says why). The scores are visited **once**: the
softmax runs online (running max and sum per reduced row) and each column tile leaves its per-row
block sums, relative to the running max at that tile, in a scratch buffer (``[rows, Nkb]`` fp32,
1/(b/S) of the reduced score matrix) with that max. A short epilogue in the same program rescales
each row's partials to the final max and sum and adds the rows of each query block. The reduced
score matrix is never stored, and the product runs once (the first version computed it twice: one
pass for the row statistics, one to normalise).

On Hopper the streamed product can take Q and K through TMA tensor descriptors over ``[B, H, N/S,
S, D]`` views (``TMA`` in the launch config, where a sweep measured it faster): a stride offset of
consecutive reduced rows is one box. The boxes hold whole stride groups only, so a program whose
rows or columns reach a partial last group (lengths not a multiple of S) walks with pointer loads.

Where the reduced width S*D is large (stride 16 at D 128: 2048) the fused product is bound by
memory traffic: a program's reduced query tile does not fit on chip and comes back for every column
tile. There (``GEMM`` in the launch config) each launch's product runs first as batched cuBLAS
GEMMs with fp32 output, one per query head of a KV group, over the causally live columns only, and
the same kernel reads those scores (``PRE``) for its online softmax and block sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ... import settings
from ...caches import shape_cache
from ...plans.geometry import cdiv
from ._triton import interpreting, tma_capable, tma_fits

LOG2E = 1.0 / math.log(2.0)
SCRATCH_BYTES = 1 << 29  # per launch; longer inputs are scored in several chunks of query blocks
# Q and K through TMA tensor descriptors: settings ``scores_tma`` (auto = wherever they can run:
# Hopper or newer, not under the interpreter, 16-bit inputs, no key padding mask); the reduced
# product through cuBLAS (``GEMM`` in the launch config): ``scores_gemm`` (auto = wherever it can
# run: CUDA, 16-bit inputs, a torch with fp32-output bmm). Tests force both on under the interpreter.
SCORES_BYTES = 1 << 30  # GEMM path: fp32 reduced scores of one launch


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
    return row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None] + shift)


@triton.jit
def _reduced_dot(q_base, k_base, KPM, b, rows, cols, Nq, Nk, offset, sqn, skn,
                 S: tl.constexpr, HEAD_DIM: tl.constexpr, R_TILE: tl.constexpr, C_TILE: tl.constexpr,
                 HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Reduced scores ``[R_TILE, C_TILE]`` = sum over t of Q[rows*S + S-1-t] . K[cols*S + t]."""
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([R_TILE, C_TILE], tl.float32)
    for t in range(S):
        qpos = rows * S + (S - 1 - t)
        kpos = cols * S + t
        q_ok = qpos < Nq
        k_ok = kpos < Nk
        if HAS_KPM:
            q_ok = q_ok & (tl.load(KPM + b * Nk + qpos + offset, mask=q_ok, other=0) != 0)
            k_ok = k_ok & (tl.load(KPM + b * Nk + kpos, mask=k_ok, other=0) != 0)
        qt = tl.load(q_base + qpos[:, None] * sqn + d[None, :], mask=q_ok[:, None], other=0.0)
        kt = tl.load(k_base + kpos[None, :] * skn + d[:, None], mask=k_ok[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(qt, kt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _reduced_dot_desc(QD, KD, b, hq, hkv, r0, c0, S: tl.constexpr, HEAD_DIM: tl.constexpr,
                      R_TILE: tl.constexpr, C_TILE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """The same product from tensor descriptors over ``[B, H, N // S, S, D]`` views of Q and K:
    stride offset t of reduced rows r0.. (or columns c0..) is one box, which the copy engine
    fetches without per-element address math or masks; it covers only whole stride groups."""
    acc = tl.zeros([R_TILE, C_TILE], tl.float32)
    for t in range(S):
        qt = QD.load([b, hq, r0, S - 1 - t, 0]).reshape(R_TILE, HEAD_DIM)
        kt = KD.load([b, hkv, c0, t, 0]).reshape(C_TILE, HEAD_DIM)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        acc = tl.dot(qt, tl.trans(kt), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _walk_columns(QD, KD, KPM, PS, PM, b, hq, hkv, I, rows, row_in, srow, ncol, q_base, k_base,
                  sc_base, sc_ld, sc_rows, r0, Nq, Nk, offset, shift, nkb, n_ct, sqn, skn, qk_scale,
                  S: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, R_TILE: tl.constexpr,
                  C_TILE: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                  Q_RESIDENT: tl.constexpr, FLATTEN: tl.constexpr, DESC: tl.constexpr, PRE: tl.constexpr):
    """The program's one pass over its reduced columns: online softmax per reduced row, and per
    column tile the rows' block sums (relative to the running max then) into the scratch buffer.
    Returns the final running max and sum per row. ``PRE``: the unscaled reduced scores were
    computed before the launch (``[sc_rows, sc_ld]`` fp32 from reduced row ``r0``) and are read,
    not formed."""
    CB: tl.constexpr = C_TILE // R  # key blocks per column tile
    SD: tl.constexpr = S * HEAD_DIM
    # element e of a reduced row is (t, d) = (e // D, e % D): query position iS + S-1-t (reversed
    # stride order), key position jS + t -- dot products run along antidiagonals
    e = tl.arange(0, SD)
    t_e = e // HEAD_DIM
    d_e = e % HEAD_DIM
    if Q_RESIDENT:  # the whole reduced query tile [R_TILE, S*D] stays in registers
        qpos = rows[:, None] * S + (S - 1 - t_e)[None, :]
        q_ok = qpos < Nq
        if HAS_KPM:  # padded positions contribute nothing to a stride group
            q_ok = q_ok & (tl.load(KPM + b * Nk + qpos + offset, mask=q_ok, other=0) != 0)
        q = tl.load(q_base + qpos * sqn + d_e[None, :], mask=q_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
    m_i = tl.full([R_TILE], float("-inf"), tl.float32)
    l_i = tl.zeros([R_TILE], tl.float32)
    # FLATTEN: the column loop and the streamed product's S-step loop pipeline as one loop (at
    # stride 8 the inner loop alone is 8 steps, and restarting its pipeline per column tile left
    # the tensor cores idle between tiles)
    for c0 in tl.range(0, ncol, C_TILE, flatten=FLATTEN):
        cols = c0 + tl.arange(0, C_TILE)
        if PRE:
            lr = rows - r0
            s = tl.load(sc_base + lr[:, None] * sc_ld + cols[None, :],
                        mask=(lr < sc_rows)[:, None] & (cols < sc_ld)[None, :], other=0.0) * qk_scale
        elif DESC:
            s = _reduced_dot_desc(QD, KD, b, hq, hkv, I * R, c0, S, HEAD_DIM, R_TILE, C_TILE,
                                  UPCAST, DOT_PREC) * qk_scale
        elif Q_RESIDENT:
            kpos = cols[None, :] * S + t_e[:, None]  # [SD, C_TILE]
            k_ok = kpos < Nk
            if HAS_KPM:
                k_ok = k_ok & (tl.load(KPM + b * Nk + kpos, mask=k_ok, other=0) != 0)
            kt = tl.load(k_base + kpos * skn + d_e[:, None], mask=k_ok, other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        else:
            # a reduced tile too wide for registers (S*D = 1024 at D 128, stride 8): the product runs
            # as S [R_TILE, D] x [D, C_TILE] steps, one stride offset t each, so the loads pipeline
            # like a GEMM's K loop; the query slices come back from L2 for each column tile
            s = _reduced_dot(q_base, k_base, KPM, b, rows, cols, Nq, Nk, offset, sqn, skn,
                             S, HEAD_DIM, R_TILE, C_TILE, HAS_KPM, UPCAST, DOT_PREC) * qk_scale
        ok = _row_col_ok(KPM, b, rows, cols, Nq, Nk, offset, shift, S, HAS_KPM) & row_in[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, 1)
        m_i = m_new
        # per-row block sums of this tile, relative to this tile's running max
        part = tl.sum(tl.reshape(p, [R_TILE, CB, R]), 2)
        J = c0 // R + tl.arange(0, CB)
        tl.store(PS + srow[:, None] * nkb + J[None, :], part, mask=row_in[:, None] & (J[None, :] < nkb))
        tl.store(PM + srow * n_ct + c0 // C_TILE, m_new, mask=row_in)
    return m_i, l_i


@triton.jit(do_not_specialize=["Nq", "Nk", "I0", "I1", "nkb", "n_ct"])  # lengths: see _triton.py
def _scores_kernel(
    Q, K, QD, KD, KPM, ACT, W, PS, PM, SC,
    sqb, sqh, sqn, skb, skh, skn, swb, swh, swi, s_g, s_bh, sc_ld, sc_rows,
    Hq, Hkv, Nq, Nk, I0, I1, nkb, n_ct, qk_scale,
    S: tl.constexpr, R: tl.constexpr, HEAD_DIM: tl.constexpr, QB: tl.constexpr,
    C_TILE: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_ACT: tl.constexpr, Q_RESIDENT: tl.constexpr, FLATTEN: tl.constexpr = False, TMA: tl.constexpr = False,
    PRE: tl.constexpr = False,
):
    R_TILE: tl.constexpr = QB * R
    CB: tl.constexpr = C_TILE // R  # key blocks per column tile
    # last query blocks first: under causality they walk the most columns (better tail balance)
    I = I0 + (tl.num_programs(0) - 1 - tl.program_id(0)) * QB
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hkv = hq // (Hq // Hkv)
    offset = Nk - Nq
    shift = (offset + S - 1) // S  # bottom-right alignment in reduced units
    rows = I * R + tl.arange(0, R_TILE)
    row_in = rows < I1 * R
    # reduced keys right of the last block's last reduced diagonal are all masked
    ncol = tl.minimum(nkb * R, tl.minimum(I + QB, I1) * R + shift)
    if HAS_ACT:  # a query group routed to another branch: its rows stay zero (no column is walked)
        ncol = tl.where(tl.load(ACT + b * Hkv + hkv) != 0, ncol, 0)
    q_base = Q + b * sqb + hq * sqh
    k_base = K + b * skb + hkv * skh
    sc_base = SC + (hq % (Hq // Hkv)) * s_g + (b * Hkv + hkv) * s_bh  # PRE: scores of [G, B*Hkv, rows, cols]
    # scratch rows of this program (relative to the launch's first reduced row)
    srow = pid_bh * (I1 - I0) * R + (rows - I0 * R)
    r0 = I0 * R  # PRE: the launch's first reduced row, row 0 of its score matrix
    if TMA:
        # the descriptors hold whole stride groups only: a program whose rows include the last,
        # partial query group, or whose columns reach the partial key group, takes pointer loads
        part_row = Nq // S
        rows_whole = (Nq % S == 0) | (part_row < I * R) | (part_row >= tl.minimum(I + QB, I1) * R)
        cols_whole = (Nk % S == 0) | (ncol <= Nk // S)
        if rows_whole & cols_whole:
            m_i, l_i = _walk_columns(QD, KD, KPM, PS, PM, b, hq, hkv, I, rows, row_in, srow, ncol, q_base, k_base,
                                     sc_base, sc_ld, sc_rows, r0, Nq, Nk, offset, shift, nkb, n_ct, sqn, skn,
                                     qk_scale, S, R, HEAD_DIM, R_TILE, C_TILE, HAS_KPM, UPCAST, DOT_PREC,
                                     Q_RESIDENT, FLATTEN, True, False)
        else:
            m_i, l_i = _walk_columns(QD, KD, KPM, PS, PM, b, hq, hkv, I, rows, row_in, srow, ncol, q_base, k_base,
                                     sc_base, sc_ld, sc_rows, r0, Nq, Nk, offset, shift, nkb, n_ct, sqn, skn,
                                     qk_scale, S, R, HEAD_DIM, R_TILE, C_TILE, HAS_KPM, UPCAST, DOT_PREC,
                                     Q_RESIDENT, FLATTEN, False, False)
    else:
        m_i, l_i = _walk_columns(QD, KD, KPM, PS, PM, b, hq, hkv, I, rows, row_in, srow, ncol, q_base, k_base,
                                 sc_base, sc_ld, sc_rows, r0, Nq, Nk, offset, shift, nkb, n_ct, sqn, skn,
                                 qk_scale, S, R, HEAD_DIM, R_TILE, C_TILE, HAS_KPM, UPCAST, DOT_PREC,
                                 Q_RESIDENT, FLATTEN, False, PRE)

    tl.debug_barrier()  # the epilogue reads partials other threads of this program wrote
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    qi = (I - I0) + tl.arange(0, QB)
    w_rows = W + b * swb + hq * swh + qi * swi
    for c0 in range(0, ncol, C_TILE):
        J = c0 // R + tl.arange(0, CB)
        part = tl.load(PS + srow[:, None] * nkb + J[None, :], mask=row_in[:, None] & (J[None, :] < nkb), other=0.0)
        m_t = tl.load(PM + srow * n_ct + c0 // C_TILE, mask=row_in, other=float("-inf"))
        # rows with nothing visible yet at this tile had no mass in it (factor 0, not exp2(+big))
        f = tl.where(m_t == float("-inf"), 0.0, tl.exp2(tl.where(m_t == float("-inf"), 0.0, m_t) - m_fin)) * inv_l
        blocks = tl.sum(tl.reshape(part * f[:, None], [QB, R, CB]), 1)
        tl.store(w_rows[:, None] + J[None, :], blocks, mask=(qi[:, None] < I1 - I0) & (J[None, :] < nkb))


def launch_config(R: int, D: int, S: int) -> dict:
    """Tile shapes: >= 64 reduced rows per program (>= 16 under the interpreter), and whether the
    reduced query tile stays in registers (``Q_RESIDENT``: up to 64 KB of bf16) or streams in S
    slices, or the product comes from cuBLAS (``GEMM``, ``GEMM_ROWS`` reduced rows per launch);
    a module-level function: ``bench/gpu/tune.py`` swaps it."""
    if interpreting():
        return dict(QB=max(1, 16 // R), C_TILE=max(R, 16), Q_RESIDENT=S * D <= 256)
    # H100 sweeps (bench/gpu/tune.py; run-to-run noise 10-20 %): the
    # streamed product, its column and stride loops flattened into one pipelined loop, won at every
    # shape measured with pointer loads. What bounds it: a [rows, D] x [D, 128] step reloads its
    # query slice from L2 for every column tile (the [rows, S*D] reduced tile does not fit on chip
    # at D 128). H200 whole-call sweep, 128K, D 128, 32/8 heads, 128-token blocks
    # (bench/gpu/tune.py): stride 8, pointer loads at
    # 128 rows x 128 columns, 8 warps, 3 stages: 23.1 ms (the best TMA tile 24.0); stride 16, Q and
    # K through TMA at 128 rows, 8 warps, 3 stages, loops not flattened: 14.6 ms against 15.8 for
    # the pointer tile. TMA is chosen only where it was measured (D >= 128).
    # H200 sweep of the cuBLAS variant (bench/gpu/tune.py): at
    # stride 16 the reduced product through cuBLAS (fp32 out, 512-1024 reduced rows per launch) read
    # by this kernel at 64 rows x 128 columns, 8 warps: 11.0 ms against 14.8 for the TMA tile -- the
    # fused product is bound by HBM traffic (each program reloads its 512 KB reduced query tile per
    # column tile; cuBLAS's tiling reuses both operands); at stride 8 (S*D 1024) the GEMM path lost,
    # 26.1 ms against 23.2. GEMM is chosen only where it was measured (S >= 16, D >= 128).
    if S >= 16 and D >= 128:
        return dict(QB=max(1, 64 // R), C_TILE=max(R, 128), num_warps=8, num_stages=2, Q_RESIDENT=False,
                    GEMM=True, GEMM_ROWS=512)
    wide = S <= 8
    return dict(QB=max(1, (128 if wide else 64) // R), C_TILE=max(R, 128), num_warps=8 if wide else 4,
                num_stages=3, Q_RESIDENT=False, FLATTEN=True, TMA=False)


def _descriptors(q, k, S: int, meta: dict):
    """Tensor descriptors over ``[B, H, N // S, S, D]`` views: a box of ``[rows, 1, D]`` is stride
    offset t of consecutive reduced rows, for any token stride (contiguous or token-major layouts)."""
    def view(x, rows):
        B, H, N, D = x.shape
        return TensorDescriptor(x, [B, H, N // S, S, D], [x.stride(0), x.stride(1), S * x.stride(2), x.stride(2), 1],
                                [1, 1, rows, 1, D])
    return view(q, meta["QB"] * meta["R"]), view(k, meta["C_TILE"])


@shape_cache(8)
def _bmm_fp32_out(device) -> bool:
    """Whether this torch has ``bmm(..., out_dtype=float32)`` for 16-bit inputs on ``device``
    (CUDA, torch >= 2.8): the reduced product must not round its scores to 16 bits."""
    x = torch.zeros(1, 16, 16, dtype=torch.bfloat16, device=device)
    try:
        torch.bmm(x, x, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _gemm_path(q, cfg_gemm: bool, active_heads) -> bool:
    """Reduced product through cuBLAS, then the kernel reads it (``PRE``): where the config asks
    for it and it can run. Declined for routed layers (``active_heads``): the fused kernel skips
    the unrouted query groups without a host sync, the GEMM would score them all."""
    if not cfg_gemm or active_heads is not None:
        return False
    forced = settings.get("scores_gemm")
    if forced is not None:
        return forced
    return (not interpreting() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and _bmm_fp32_out(q.device))


def _reduced_keys(k, S: int, key_padding_mask):
    """Reduced keys ``[B*Hkv, Nk/S, S*D]`` with the stride order reversed (a copy; K is Hq/Hkv
    times smaller than Q): padded positions zeroed (they contribute nothing to a stride group) and
    a partial last group zero-filled, as the fused kernel's masked loads do."""
    B, Hkv, Nk, D = k.shape
    if key_padding_mask is not None:
        k = k * key_padding_mask[:, None, :, None].to(k.dtype)
    nk = cdiv(Nk, S)
    if nk * S != Nk:
        k = F.pad(k, (0, 0, 0, nk * S - Nk))
    return k.reshape(B, Hkv, nk, S, D).flip(3).reshape(B * Hkv, nk, S * D)


def _reduced_rows(q, Hkv: int, g: int, r0: int, r1: int, S: int, key_padding_mask):
    """Reduced query rows r0..r1 of group member g of every KV group, ``[B*Hkv, r1-r0, S*D]``: a
    view of a contiguous Q; a copy of this launch's rows only for other layouts (token-major
    views), for a partial last group (zero-filled) or under a padding mask (padded positions zeroed)."""
    B, Hq, Nq, D = q.shape
    Nk = key_padding_mask.shape[1] if key_padding_mask is not None else Nq
    x = q.unflatten(1, (Hkv, Hq // Hkv))[:, :, g, r0 * S: r1 * S]
    if key_padding_mask is not None:
        x = x * key_padding_mask[:, None, Nk - Nq + r0 * S: Nk - Nq + r0 * S + x.shape[2], None].to(x.dtype)
    if x.shape[2] != (r1 - r0) * S:
        x = F.pad(x, (0, 0, 0, (r1 - r0) * S - x.shape[2]))
    return x.reshape(B * Hkv, r1 - r0, S * D)


def _reduced_product(q, kr, r0: int, r1: int, ncol: int, S: int, key_padding_mask, out) -> None:
    """``out[g]`` = reduced rows r0..r1 of query group member g times the first ``ncol`` reduced
    keys, fp32 (``out`` ``[G, B*Hkv, r1-r0, ncol]``): one batched GEMM per group member."""
    Hkv = kr.shape[0] // q.shape[0]
    kt = kr[:, :ncol].transpose(1, 2)
    for g in range(q.shape[1] // Hkv):
        a = _reduced_rows(q, Hkv, g, r0, r1, S, key_padding_mask)
        if a.is_cuda:
            torch.bmm(a, kt, out_dtype=torch.float32, out=out[g])
        else:  # the interpreter's tests: fp32 math, like the kernel's accumulator
            torch.bmm(a.float(), kt.float(), out=out[g])


def block_scores(q, k, *, stride: int, block_size: int, chunk_size: int, key_padding_mask=None, active_heads=None):
    """Yield ``(I0, I1, W)`` like the torch backend: W ``[B, Hq, I1-I0, Nkb]`` fp32; rows of query
    groups outside ``active_heads`` (``[B, Hkv]`` bool) are left at zero, unscored."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    S, b = stride, block_size
    R = b // S
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
    cfg = dict(launch_config(R, D, S))
    tma = cfg.pop("TMA", None)
    gemm = _gemm_path(q, cfg.pop("GEMM", False), active_heads)
    gemm_rows = cfg.pop("GEMM_ROWS", 512)
    if gemm:
        cfg.update(Q_RESIDENT=False, FLATTEN=False, PRE=True)
    meta = dict(S=S, R=R, HEAD_DIM=D, HAS_KPM=key_padding_mask is not None, HAS_ACT=active_heads is not None,
                UPCAST=interpreting() and q.dtype != torch.float32,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", **cfg)
    # the config may decline TMA; it never forces it where it cannot run (padding masks need the
    # per-position loads, and a tile that holds the query tile in registers has its own loads)
    meta["TMA"] = (not gemm and tma_capable(q.device, settings.get("scores_tma")) and tma is not False
                   and key_padding_mask is None
                   and not meta.get("Q_RESIDENT") and q.dtype in (torch.float16, torch.bfloat16)
                   and Nq >= S and Nk >= S and tma_fits(q, k))
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    act = None if active_heads is None else active_heads.to(torch.int8).contiguous()
    n_ct = triton.cdiv(nkb * R, max(R, 16))  # column tiles at the smallest C_TILE a retry may use
    # scratch per query block: R rows of Nkb partial sums and n_ct running maxima per head
    per_block = B * Hq * R * (nkb + n_ct) * 4
    # on a GPU as few launches as the scratch budget allows; the interpreter keeps the caller's chunks
    step = chunk_size // b if interpreting() else max(meta["QB"], SCRATCH_BYTES // per_block // meta["QB"] * meta["QB"])
    if gemm:
        kr = _reduced_keys(k, S, key_padding_mask)
        nq, nk = cdiv(Nq, S), kr.shape[1]
        if not interpreting():
            # GEMM_ROWS reduced rows per launch: each launch's product also fills the upper
            # triangle of its diagonal square (rows / 2 of wasted columns per row), and its fp32
            # scores must fit SCORES_BYTES
            fit = SCORES_BYTES // (B * Hq * R * min(nkb * R, nk) * 4)
            step = max(1, min(step, max(1, gemm_rows // R), fit))
        shift = (Nk - Nq + S - 1) // S
        sc_buf = None
    scale = 1.0 / (math.sqrt(D) * S)
    scratch = None
    for I0 in range(0, nqb, step):
        I1 = min(nqb, I0 + step)
        rows = B * Hq * (I1 - I0) * R
        if scratch is None:
            scratch = torch.empty(rows * (nkb + n_ct), dtype=torch.float32, device=q.device)
        ps, pm = scratch[: rows * nkb], scratch[rows * nkb: rows * (nkb + n_ct)]
        w = torch.zeros((B, Hq, I1 - I0, nkb), dtype=torch.float32, device=q.device)
        sc, sc_dims = w, (0, 0, 0, 0)
        if gemm:
            r0, r1 = I0 * R, min(I1 * R, nq)
            ncol = min(nkb * R, I1 * R + shift, nk)  # columns right of the last diagonal: all masked
            if sc_buf is None:  # sized for the widest launch: the last
                sc_buf = torch.empty(Hq * B * (r1 - r0) * min(nkb * R, nk), dtype=torch.float32, device=q.device)
            sc = sc_buf[: Hq * B * (r1 - r0) * ncol].view(Hq // Hkv, B * Hkv, r1 - r0, ncol)
            _reduced_product(q, kr, r0, r1, ncol, S, key_padding_mask, sc)
            sc_dims = (sc.stride(0), sc.stride(1), ncol, r1 - r0)
        args = (kpm if kpm is not None else w, act if act is not None else w, w, ps, pm, sc,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                w.stride(0), w.stride(1), w.stride(2), *sc_dims, Hq, Hkv, Nq, Nk, I0, I1, nkb, n_ct, scale * LOG2E)
        while True:
            qd, kd = _descriptors(q, k, S, meta) if meta["TMA"] else (q, k)
            try:
                _scores_kernel[(triton.cdiv(I1 - I0, meta["QB"]), B * Hq)](q, k, qd, kd, *args, **meta)
                break
            except triton.runtime.errors.OutOfResources:  # smaller tiles for this GPU
                if meta["QB"] * R <= 16 and meta["C_TILE"] <= max(R, 16):
                    raise
                meta = {**meta, "QB": max(1, meta["QB"] // 2), "C_TILE": max(R, 16, meta["C_TILE"] // 2),
                        "num_stages": 1}
        yield I0, I1, w
