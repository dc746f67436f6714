"""Top-k block scores from mean-pooled keys (NSA's selection branch), as an op with backends.

For query block I of KV head h (block b, bottom-right causal offset ``Nk - Nq``):

    score[B, h, I, J] = sum over the group's query heads and the block's real query rows r of
                        softmax_J( q_r . kmean_J / sqrt(D) )   over the *complete past* blocks J

where ``kmean_J`` is the mean of block J's real keys (in the keys' dtype, see ``pooled_keys``) and a
complete past block lies wholly before the block's first query and inside Nk
(``(J + 1) b - 1 <= I b + Nk - Nq`` and ``(J + 1) b <= Nk``).
Blocks with no real key and padded query rows take no part. Returns fp32 (fp64 for fp64 inputs)
``[B, Hkv, Nqb, Nkb]``; entries that are not candidates are 0.

Backends: ``torch`` (chunks of query blocks, the score matrix per chunk) and ``triton``
(``attnzoo.ops.kernels.triton_pooled``: one launch, scores never stored).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..plans import cdiv
from .dispatch import DEFAULT_TOLERANCES, Backend, Tolerance, choose, make_request, register_backend
from .merge import masked_softmax_


def pooled_keys(k: torch.Tensor, block: int, key_padding_mask=None):
    """``(kmean [B, Hkv, Nkb, D], block_real [B, Nkb] or None)``: each block's mean over its real
    keys, and which blocks hold one (None without padding: every block does).

    The mean is accumulated in fp32 (fp64 for fp64 keys) and returned in ``k``'s dtype: pooled
    keys are keys, stored at the model's precision (NSA's compressed keys are too), so a 16-bit
    model scores them with one tensor-core product. Every backend uses these same pooled keys.

    Without padding the last, partial block is averaged over ``block`` slots; it is never a
    complete past block, so its mean is never used.
    """
    B, Hkv, Nk, D = k.shape
    nkb = cdiv(Nk, block)
    dt = torch.float64 if k.dtype == torch.float64 else torch.float32
    kp = F.pad(k, (0, 0, 0, nkb * block - Nk)).view(B, Hkv, nkb, block, D)
    if key_padding_mask is None:
        return kp.mean(3, dtype=dt).to(k.dtype), None
    real = F.pad(key_padding_mask.to(dt), (0, nkb * block - Nk)).view(B, 1, nkb, block, 1)
    count = real.sum(3)
    kmean = (kp.to(dt) * real).sum(3) / count.clamp(min=1)
    return kmean.to(k.dtype), count[:, 0, :, 0] > 0


def past_blocks(q_len: int, kv_len: int, block: int, device) -> torch.Tensor:
    """Bool ``[Nqb, Nkb]``: key blocks wholly before each query block's first query and inside Nk."""
    nqb, nkb = cdiv(q_len, block), cdiv(kv_len, block)
    first_q = torch.arange(nqb, device=device)[:, None] * block + (kv_len - q_len)
    end = (torch.arange(nkb, device=device)[None, :] + 1) * block
    return (end - 1 <= first_q) & (end <= kv_len)


def ranking_keys(score: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """int64 keys that order candidates by descending score, ties to the lower block index (what a
    stable descending sort gives), and put non-candidates (-1) last.

    The score's fp32 bits (monotonic for floats >= 0) are shifted over the reversed column index,
    so no two keys tie: a ``topk`` of the keys cannot depend on its tie order, and needs no sort.
    """
    n = score.shape[-1]
    rev = n - 1 - torch.arange(n, device=score.device)
    return torch.where(candidate, (score.float().clamp(min=0).view(torch.int32).long() << 24) | rev, -1)


def _torch_scores(q, k, *, block_size: int, chunk_size: int, key_padding_mask=None, masked: bool = False,
                  sink_blocks: int = 0, local_blocks: int = 0):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g, b = Hq // Hkv, block_size
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kmean, block_real = pooled_keys(k, b, key_padding_mask)
    kmean = kmean.to(dt)
    qp = F.pad(q.to(dt), (0, 0, 0, nqb * b - Nq)) / math.sqrt(D)
    q_real = torch.arange(nqb * b, device=q.device)[None] < Nq
    if key_padding_mask is not None:
        q_real = q_real & F.pad(key_padding_mask[:, Nk - Nq:], (0, nqb * b - Nq))
    past = past_blocks(Nq, Nk, b, q.device)
    out = torch.zeros(B, Hkv, nqb, nkb, dtype=dt, device=q.device)
    step = chunk_size // b
    for I0 in range(0, nqb, step):
        I1 = min(nqb, I0 + step)
        C = I1 - I0
        # blocks right of the chunk's last query are never complete past blocks: skip them
        ncol = min(nkb, max(0, ((I1 - 1) * b + Nk - Nq + 1) // b))
        if ncol == 0:
            continue
        qc = qp[:, :, I0 * b: I1 * b].reshape(B, Hkv, g * C * b, D)
        s = (qc @ kmean[:, :, :ncol].transpose(-1, -2)).view(B, Hkv, g, C, b, ncol)
        rows_real = q_real[:, I0 * b: I1 * b].reshape(-1, 1, 1, C, b, 1)  # padded rows vote for nothing
        allowed = past[None, None, None, I0:I1, None, :ncol] & rows_real
        if block_real is not None:
            allowed = allowed & block_real[:, None, None, None, None, :ncol]
        out[:, :, I0:I1, :ncol] = masked_softmax_(s, allowed).sum(4).sum(2)
    if masked:
        cand = past[None, None] if block_real is None else past[None, None] & block_real[:, None, None, :]
        out.masked_fill_(~cand, -1.0)
        if sink_blocks or local_blocks:
            out.masked_fill_(cand & forced_blocks(past, sink_blocks, local_blocks), FIRST)
    return out


# the score of a forced block (a sink or local block): finite, above any pooled softmax sum
FIRST = torch.finfo(torch.float32).max


def forced_blocks(past: torch.Tensor, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """Bool ``[Nqb, Nkb]``: the past blocks a query block keeps besides its top-k, the first
    ``sink_blocks`` and the ``local_blocks`` just before its own (``past``: ``past_blocks``; the
    own blocks follow the past ones, so the first lies at the row's count of past blocks)."""
    col = torch.arange(past.shape[-1], device=past.device)[None, :]
    own_lo = past.sum(-1, keepdim=True)
    return past & ((col < sink_blocks) | (col >= own_lo - local_blocks))


register_backend(Backend(
    op="pooled_scores", name="torch", fn=_torch_scores, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), plan_kinds=("scores",),
    backward=False, lse=False, description="torch: q . pooled keys per chunk of query blocks, fp32 softmax",
    tolerances={**DEFAULT_TOLERANCES, torch.float64: Tolerance(out=1e-10, lse=1e-10, grad=1e-10)}))


def pooled_block_scores(q, k, *, block_size: int, chunk_size: int = 1024, key_padding_mask=None,
                        masked: bool = False, sink_blocks: int = 0, local_blocks: int = 0,
                        backend: str | None = None) -> torch.Tensor:
    """``[B, Hkv, Nqb, Nkb]`` top-k block scores (see the module doc); with ``masked=True`` blocks that
    are not candidates hold -1, and candidates among the first ``sink_blocks`` blocks and the
    ``local_blocks`` before each query block's own hold ``FIRST`` (they outrank every score; the
    Triton backend writes both from the kernel, with no pass over the scores). Scores feed a
    discrete selection, so they carry no gradient (q and k are detached)."""
    for name, value in (("sink_blocks", sink_blocks), ("local_blocks", local_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if (sink_blocks or local_blocks) and not masked:
        raise ValueError("sink_blocks / local_blocks mark candidates: they need masked=True")
    q, k = q.detach(), k.detach()
    req = make_request("pooled_scores", q, k, k, "scores", return_lse=False, key_padding_mask=key_padding_mask,
                       causal=True, block_size=(block_size, block_size))
    impl = choose(req, backend)
    return impl.fn(q, k, block_size=block_size, chunk_size=chunk_size, key_padding_mask=key_padding_mask, masked=masked,
                   sink_blocks=sink_blocks, local_blocks=local_blocks)
