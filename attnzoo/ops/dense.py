"""Dense attention: SDPA backend (CPU: the fused flash kernel, which also returns lse).

FlashInfer joins through the same dispatch on CUDA (see ``attnzoo.ops.kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plans import BlockPlan
from ._checks import check_qkv, default_scale
from .block_sparse import blocked_attention
from .dispatch import Backend, choose, make_request, register_backend
from .merge import merge_attention


def _padding_bias(key_padding_mask, dtype):
    """Additive ``[B, 1, 1, Nk]`` bias: 0 for real keys, -inf for padding (broadcast, not N x N)."""
    if key_padding_mask is None:
        return None
    bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return bias.masked_fill(~key_padding_mask, float("-inf"))[:, None, None, :]


def _rows_without_keys(key_padding_mask, q_len: int, causal: bool):
    """Bool ``[B, 1, Nq]`` (or None): rows whose visible keys are all padding."""
    if key_padding_mask is None:
        return None
    if not causal:
        return (~key_padding_mask.any(-1))[:, None, None].expand(-1, 1, q_len)
    seen = key_padding_mask.cumsum(-1)[:, -q_len:]  # real keys at or before each row's diagonal
    return (seen == 0)[:, None, :]


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _FlashCPU(torch.autograd.Function):
    """aten's CPU flash kernel with a backward that also honours the lse gradient.

    The kernel handles GQA natively (no K/V repeat) and returns lse, but its own autograd drops
    d(lse), which callers need (merging partial attentions, routers). With dlse/ds = p:
    dq += scale * dlse * (P @ K)   (one more forward with V := K)
    dk += scale * P^T (dlse * Q)   (the dV output of the backward kernel with dO := dlse * Q)
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, bias, scale, empty):
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, bias, empty)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        if empty is not None:  # the kernel reports lse = 0 for rows with no visible key
            lse = lse.masked_fill(empty, float("-inf"))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias, empty = ctx.saved_tensors
        kw = dict(attn_mask=bias, scale=ctx.scale)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _FLASH_CPU_BWD(dout.contiguous(), q, k, v, out, lse, 0.0, ctx.causal, **kw)
        if dlse is not None:
            if empty is not None:
                dlse = dlse.masked_fill(empty, 0.0)
            w = dlse[..., None] * ctx.scale
            pk, _ = _FLASH_CPU(q, k, k, 0.0, ctx.causal, **kw)
            dq = dq + (w * pk.float()).to(dq.dtype)
            _, _, dk_lse = _FLASH_CPU_BWD((w * q.float()).to(q.dtype), q, k, v, out, lse, 0.0,
                                          ctx.causal, **kw)
            dk = dk + dk_lse
        return dq, dk, dv, None, None, None, None


def _unit_stride(x):
    """aten's CPU flash kernel reads the head dim as contiguous whatever the stride says (it gives
    wrong numbers for a transposed or strided last dim), so such inputs are copied first."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _flash_cpu(q, k, v, causal, key_padding_mask, scale):
    # top-left causal only; callers handle the bottom-right alignment
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    empty = _rows_without_keys(key_padding_mask, q.shape[2], causal)
    return _FlashCPU.apply(q, k, v, causal, _padding_bias(key_padding_mask, q.dtype), scale, empty)


def _sdpa_cpu(q, k, v, *, causal, key_padding_mask, scale, return_lse):
    nq, nk = q.shape[2], k.shape[2]
    if not causal or nq == nk:
        return _flash_cpu(q, k, v, causal, key_padding_mask, scale)
    # Bottom-right causal with Nq < Nk: every query sees the whole prefix [0, Nk-Nq), and the
    # suffix is a square causal problem; merge the two by lse instead of building a mask.
    off = nk - nq
    kpm_pre = kpm_suf = None
    if key_padding_mask is not None:
        kpm_pre, kpm_suf = key_padding_mask[:, :off], key_padding_mask[:, off:]
    o1, l1 = _flash_cpu(q, k[:, :, :off], v[:, :, :off], False, kpm_pre, scale)
    o2, l2 = _flash_cpu(q, k[:, :, off:], v[:, :, off:], True, kpm_suf, scale)
    return merge_attention(o1, l1, o2, l2)


def _sdpa_cpu_backend(q, k, v, *, causal, key_padding_mask, scale, return_lse):
    return _sdpa_cpu(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


SDPA = register_backend(Backend(
    op="dense", name="sdpa", fn=_sdpa_cpu_backend, devices=("cpu",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), plan_kinds=("dense",),
    backward=True, lse=True,
    description="CPU: aten's fused flash kernel with lse and d(lse), GQA without K/V repeat, "
                "bottom-right causal by a prefix/suffix lse merge"))


def _sdpa_cuda(q, k, v, *, causal, key_padding_mask, scale, return_lse):
    nq, nk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    mask = None
    if key_padding_mask is not None:  # decode only (see _sdpa_cuda_limits): one row, no N x N mask
        mask = key_padding_mask[:, None, None, :]
    # bottom-right causal: Nq == Nk is SDPA's own causal rule; one query against a cache sees every
    # key; other Nq < Nk are declined (SDPA's causal flag is top-left)
    is_causal = causal and nq == nk and nq > 1
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if key_padding_mask is not None:  # a row whose keys are all padding is zeros, not NaN
        out = torch.where(key_padding_mask.any(-1)[:, None, None, None], out, 0.0)
    return out, None


def _sdpa_cuda_limits(req):
    if req.causal and req.q_len != req.kv_len and req.q_len != 1:
        return "bottom-right causal with 1 < Nq < Nk (SDPA's causal flag is top-left)"
    if req.has_padding and req.q_len != 1:
        return "key_padding_mask only for one-query decode (a causal + padding mask would be N x N)"
    return None


# PyTorch's default SDPA dispatch picks cuDNN / FA3-class kernels on Hopper: measured 621 TFLOP/s
# at 64K (Hq 32 / Hkv 8, D 128) against ~376 for FlashInfer fa2 and 330 for SDPA's flash backend
# forced (H100, torch 2.11; bench/gpu). It is first in dense's list on CUDA for that reason.
SDPA_CUDA = register_backend(Backend(
    op="dense", name="sdpa_cuda", fn=_sdpa_cuda, devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), plan_kinds=("dense",),
    backward=True, lse=False, check=_sdpa_cuda_limits,
    description="CUDA: torch SDPA's default dispatch (cuDNN/flash), GQA without K/V repeat; no lse"))


# Why a fallback: on CUDA, SDPA returns no lse and takes padding only at decode, and Triton takes head
# dims 16/32/64/128/256 -- so a head dim of 8, 80 or 96 with padding at prefill (or asking for lse)
# had no dense backend there (the GPU fuzz found it). The portable blocked path over a plan keeping
# every visible block takes every case; its plan is B x Hkv x (N/128)^2 int32, not an N x N mask.
FALLBACK_BLOCK = 128


def _blocked_dense(q, k, v, *, causal, key_padding_mask, scale, return_lse):
    B, Hkv, Nk = k.shape[0], k.shape[1], k.shape[2]
    plan = BlockPlan.full(B, Hkv, q.shape[2], Nk, FALLBACK_BLOCK, FALLBACK_BLOCK, causal=causal, device=q.device)
    return blocked_attention(q, k, v, plan, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)


BLOCKED = register_backend(Backend(
    op="dense", name="blocked", fn=_blocked_dense, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), plan_kinds=("dense",),
    backward=True, lse=True,
    description="portable fallback: block_sparse's blocked path over every visible block (any head dim, "
                "padding, lse, gradients)"))


def _check_row_lengths(q, k, row_lengths, causal: bool) -> None:
    if not isinstance(row_lengths, torch.Tensor) or row_lengths.ndim != 2 or row_lengths.is_floating_point():
        raise TypeError("row_lengths must be an integer tensor [B, H] (H = query heads or a divisor of them)")
    B, Hq = q.shape[:2]
    if row_lengths.shape[0] != B or Hq % row_lengths.shape[1]:
        raise ValueError(f"row_lengths has shape {tuple(row_lengths.shape)}; expected [{B}, H] with H dividing "
                         f"the {Hq} query heads")
    if row_lengths.device != q.device:
        raise ValueError(f"row_lengths is on {row_lengths.device}, q is on {q.device}")
    if not causal or q.shape[2] != k.shape[2]:
        raise ValueError("row_lengths needs causal self-attention (causal=True, Nq == Nk): a row before a "
                         "head's length must see no padded slot")


def _trimmed(impl, q, k, v, row_lengths, **kw):
    """A backend that attends over every row, on the rows before the longest head's length only
    (one host read: taken on the CPU, where it costs no sync); zeros and lse -inf after them."""
    n, m = q.shape[2], max(int(row_lengths.max()), 1)
    if m >= n:
        return impl.fn(q, k, v, **kw)
    out, lse = impl.fn(q[:, :, :m], k[:, :, :m], v[:, :, :m], **kw)
    out = torch.cat([out, out.new_zeros(*out.shape[:2], n - m, out.shape[-1])], 2)
    if lse is not None:
        lse = torch.cat([lse, lse.new_full((*lse.shape[:2], n - m), float("-inf"))], 2)
    return out, lse


def row_skipping(q, k, *, return_lse: bool = False, backend: str | None = None) -> bool:
    """Whether ``dense(q, k, ..., row_lengths=...)`` runs on a backend that skips each head's rows
    past its length on the device (no host read): what lets Token Sparse compress to a static width."""
    req = make_request("dense", q, k, k, "dense", return_lse=return_lse, key_padding_mask=None,
                       causal=True, row_lengths=True)
    return choose(req, backend).row_lengths


def dense(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None,
          return_lse: bool = False, backend: str | None = None, row_lengths=None):
    """Dense attention, q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``, bottom-right causal.

    Returns ``out`` (q's dtype) or ``(out, lse)`` (lse fp32 ``[B, Hq, Nq]``, -inf where a row
    sees no key; such rows are zeros).

    ``row_lengths`` ``[B, H]`` (causal self-attention only; H = Hq or a divisor, a group of query
    heads sharing one length): head h's rows at or past ``row_lengths[b, h]`` are padded slots whose
    output is unspecified (zeros or attention over the slots). A backend declaring ``row_lengths``
    skips them on the device; on the CPU the others run on the rows before the longest length.
    """
    check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if row_lengths is not None:
        _check_row_lengths(q, k, row_lengths, causal)
    req = make_request("dense", q, k, v, "dense", return_lse=return_lse,
                       key_padding_mask=key_padding_mask, causal=causal, row_lengths=row_lengths is not None)
    impl = choose(req, backend)
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=default_scale(q, scale), return_lse=return_lse)
    if row_lengths is None:
        out, lse = impl.fn(q, k, v, **kw)
    elif impl.row_lengths:
        out, lse = impl.fn(q, k, v, row_lengths=row_lengths, **kw)
    elif q.device.type == "cpu":
        out, lse = _trimmed(impl, q, k, v, row_lengths, **kw)
    else:  # no host read on a GPU: the backend attends over the padded rows too (correct, slower)
        out, lse = impl.fn(q, k, v, **kw)
    return (out, lse) if return_lse else out
