"""Input validation shared by every op: shapes, dtypes, devices, GQA, padding, NaN."""

from __future__ import annotations

import math

import torch

from .. import settings
from ..settings import value_checks

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _finite_check_enabled(device) -> bool:
    # a NaN inside attention silently poisons every later layer: scan where it is cheap
    return settings.get("check_finite") and value_checks(device)


def check_qkv(q, k, v, *, causal: bool = True, key_padding_mask=None, scale=None,
              dtypes=SUPPORTED_DTYPES) -> None:
    """Raise TypeError/ValueError naming the argument when q/k/v/mask/scale are unusable."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (no data): attention needs real tensors on cpu or cuda")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k batch {k.shape[0]} != q batch {B}")
    if k.shape[3] != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k has D={k.shape[3]}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) for GQA")
    if Nq == 0 or Nk == 0 or D == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and Nk < Nq:
        raise ValueError(
            f"causal attention needs Nk >= Nq (bottom-right aligned), got Nq={Nq}, Nk={Nk}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool torch.Tensor [B, Nk] (True = real token)")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(
                f"key_padding_mask must be [B, Nk] = {(B, Nk)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q is on {q.device}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive float, got {scale}")
    if _finite_check_enabled(q.device):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not all_finite(t):
                raise ValueError(f"{name} contains NaN or Inf (ATTNZOO_CHECK_VALUES=0 skips this check)")


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf. One sum decides almost always: a NaN or an Inf anywhere
    makes the sum NaN or Inf, so a finite sum proves the tensor finite. Only a non-finite sum (a NaN
    or Inf, or finite values whose sum overflowed) pays for the exact scan. On the 2-core CPU,
    [1, 9, 3072, 64] fp32: 0.2 ms against 5 ms for ``torch.isfinite(t).all()``, which
    materialises a bool tensor through several ops and was a third of an XAttention selector call."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def default_scale(q: torch.Tensor, scale) -> float:
    return float(scale) if scale is not None else q.shape[-1] ** -0.5
