"""XAttention's strided antidiagonal block scores (arXiv 2503.16428), as an op with backends.

Stride S, block b, per query head:
  Q~[i] = concat_t Q[iS + S-1-t],  K~[j] = concat_t K[jS + t]   (t = 0..S-1)
  so Q~ K~^T [i, j] is the antidiagonal sum of the S x S tile (i, j) of Q K^T, at 1/S the cost;
  P = row-softmax(Q~ K~^T / (sqrt(D) S)) with the causal rule in reduced index space;
  W[I, J] = sum of P over the (b/S) x (b/S) sub-grid of query block I and key block J.
Padded positions contribute nothing to a stride group and padded query rows do not vote, so a
*right*-padded sequence scores exactly like the same sequence alone. Stride groups and blocks start
at position 0, so left padding shifts them: ``attnzoo.stack.run`` rolls left-padded sequences to
start at row 0 first (``ops.padding``).

Backends: ``torch`` (below; GQA folded into rows, no K repeat, chunked over queries, causally
dead columns skipped) and ``triton`` (``attnzoo.ops.kernels.triton_scores``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import settings
from ..plans.geometry import cdiv
from .dispatch import DEFAULT_TOLERANCES, Backend, Tolerance, choose, make_request, register_backend
from .merge import masked_softmax_

# Query tokens per chunk on a CPU, below the selector's ``chunk_size`` (a memory bound): each chunk
# skips the columns right of its own last diagonal, so smaller chunks compute closer to the causal
# half. `python bench/cpu_selector_chunks.py` (the XAttention selector, 9/3 heads, two cores), two
# runs, chunks of 2048 (the selector's default) -> 512: 2K 8.1 -> 6.9 / 8.7 -> 7.3 ms, 3K 17.0 ->
# 12.3 / 14.0 -> 12.0 ms; at 8K no clear gain (65.4 -> 60.8 / 70.3 -> 73.7 ms). Smaller chunks (256)
# lose to per-chunk overhead. (settings ``cpu_score_chunk_tokens``)


def _torch_scores(q, k, *, stride: int, block_size: int, chunk_size: int, key_padding_mask=None, active_heads=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g, S, b = Hq // Hkv, stride, block_size
    r = b // S  # reduced positions per block
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qd, kd = q.to(dt), k.to(dt)
    if key_padding_mask is not None:
        # padded positions contribute nothing to a stride group's antidiagonal sums, so a
        # right-padded sequence scores exactly like the same sequence alone
        kd = kd * key_padding_mask[:, None, :, None]
        qd = qd * key_padding_mask[:, None, Nk - Nq:, None]
    qp = F.pad(qd, (0, 0, 0, nqb * b - Nq)) if nqb * b != Nq else qd  # F.pad copies even when it adds nothing
    kp = F.pad(kd, (0, 0, 0, nkb * b - Nk)) if nkb * b != Nk else kd
    # sum_t Q[iS + S-1-t] . K[jS + t] = sum_t Q[iS + t] . K[jS + S-1-t]: the reversed stride order
    # and the scale go on the keys, Hq/Hkv times smaller than the queries under GQA, and the
    # reduced queries are a view of Q (no copy when Q is contiguous)
    scale = 1.0 / (math.sqrt(D) * S)
    qr = qp.reshape(B, Hkv, g, nqb * r, S * D)
    kr = kp.reshape(B, Hkv, nkb * r, S, D).flip(3).mul_(scale).reshape(B, Hkv, nkb * r, S * D)
    dev = q.device
    jr = torch.arange(nkb * r, device=dev)
    key_ok = jr * S < Nk  # reduced key holds at least one real position
    q_ok = (torch.arange(nqb * r, device=dev) * S < Nq)[None]  # [1 or B, Nq~]
    if key_padding_mask is not None:
        real = F.pad(key_padding_mask, (0, nkb * b - Nk)).reshape(B, nkb * r, S).any(-1)
        key_ok = key_ok[None] & real  # [B, Nk~]
        # padded query rows vote for no block (they would spread uniform mass over all of them)
        q_real = F.pad(key_padding_mask[:, Nk - Nq:], (0, nqb * b - Nq)).reshape(B, nqb * r, S).any(-1)
        q_ok = q_ok & q_real
    else:
        key_ok = key_ok[None]
    shift = (Nk - Nq + S - 1) // S  # bottom-right alignment in reduced units
    step = chunk_size // b
    if dev.type == "cpu":
        step = max(1, min(step, settings.get("cpu_score_chunk_tokens") // b))
    for I0 in range(0, nqb, step):
        I1 = min(nqb, I0 + step)
        # columns right of the chunk's last reduced diagonal are all masked: skip them
        ncol = min(nkb, cdiv(I1 * r + shift, r)) * r
        ir = torch.arange(I0 * r, I1 * r, device=dev)
        allowed = key_ok[:, None, :ncol] & q_ok[:, I0 * r: I1 * r, None]  # [B, C~, ncol]
        allowed = allowed & (jr[None, None, :ncol] <= ir[None, :, None] + shift)
        qc = qr[:, :, :, I0 * r: I1 * r].reshape(B, Hkv, g * (I1 - I0) * r, S * D)
        s = qc @ kr[:, :, :ncol].transpose(-1, -2)  # [B, Hkv, g*C~, ncol]
        s = s.view(B, Hq, (I1 - I0) * r, ncol)
        p = masked_softmax_(s, allowed[:, None])
        # the contiguous (key) sum first: a third faster on a CPU than one reduction over both axes
        w = p.view(B, Hq, (I1 - I0) * r, ncol // r, r).sum(-1).view(B, Hq, I1 - I0, r, ncol // r).sum(3)
        yield I0, I1, F.pad(w, (0, nkb - ncol // r))



register_backend(Backend(
    op="antidiagonal_scores", name="torch", fn=_torch_scores, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), plan_kinds=("scores",),
    backward=False, lse=False, description="torch: reduced Q~ K~^T per query chunk, fp32 softmax",
    tolerances={**DEFAULT_TOLERANCES, torch.float64: Tolerance(out=1e-10, lse=1e-10, grad=1e-10)}))


def antidiagonal_block_scores(q, k, *, stride: int, block_size: int, chunk_size: int,
                              key_padding_mask=None, active_heads=None, backend: str | None = None):
    """Iterator of ``(I0, I1, W)`` over query-block chunks; W ``[B, Hq, I1-I0, Nkb]`` (fp32, fp64
    for fp64 inputs). Callers validate q/k (the selector does). ``active_heads`` (``[B, Hkv]`` bool,
    see ``selectors.CallContext``): a backend may leave the rows of other query groups at zero (the
    Triton one skips them; torch scores every row).

    Scores feed a discrete selection, so they carry no gradient: q and k are detached, and the
    call works (and dispatches the same backend) whether or not they require grad.
    """
    q, k = q.detach(), k.detach()
    req = make_request("antidiagonal_scores", q, k, k, "scores", return_lse=False,
                       key_padding_mask=key_padding_mask, causal=True,
                       block_size=(block_size, block_size), stride=stride)
    impl = choose(req, backend)
    kw = {} if active_heads is None else {"active_heads": active_heads}
    return impl.fn(q, k, stride=stride, block_size=block_size, chunk_size=chunk_size,
                   key_padding_mask=key_padding_mask, **kw)
