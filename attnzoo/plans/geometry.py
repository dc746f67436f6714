"""Block geometry under bottom-right causality, and the argument checks every plan shares."""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_index_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_causal_lengths(q_len: int, kv_len: int, causal: bool) -> None:
    if causal and kv_len < q_len:
        raise ValueError(
            f"causal attention needs kv_len >= q_len (bottom-right aligned), got q_len={q_len}, "
            f"kv_len={kv_len}"
        )


def check_qk_heads(q: torch.Tensor, k: torch.Tensor, plan_heads: int, what: str) -> None:
    hq, hkv = q.shape[1], k.shape[1]
    if plan_heads not in (hq, hkv):
        raise ValueError(
            f"{what} has {plan_heads} heads; expected Hq={hq} (per query head) or Hkv={hkv} "
            f"(per KV head, shared by its query group)"
        )


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Dense bottom-right causal mask ``[q_len, kv_len]`` (True = visible). Tests/small N only."""
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= qpos


def last_visible_block(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """``[ceil(q_len/block_q)]``: right-most key block each query block can see (bottom-right causal)."""
    nqb = cdiv(q_len, block_q)
    last_row = torch.clamp((torch.arange(nqb, device=device) + 1) * block_q, max=q_len) - 1
    return (last_row + kv_len - q_len) // block_k


def tail_query_blocks(q_len: int, kv_len: int, block_q: int, tail: int,
                      key_padding_mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Bool ``[B, Nqb]`` (``[1, Nqb]`` without a mask): the query blocks holding any of the last
    ``tail`` real query tokens of each sequence. A sequence ends after its last real key (right or
    left padding alike); query row ``i`` sits at key position ``i + kv_len - q_len``."""
    nqb = cdiv(q_len, block_q)
    if key_padding_mask is None:
        ends = torch.full((1,), kv_len, device=device)
    else:  # one past the last real key, found without a host sync
        pos = torch.arange(1, kv_len + 1, device=key_padding_mask.device)
        ends = (key_padding_mask.to(pos.dtype) * pos).amax(-1)
    offset = kv_len - q_len
    lo = (ends - tail - offset).clamp(min=0) // block_q
    hi = torch.div(ends - offset - 1, block_q, rounding_mode="floor")  # < lo when no real query rows
    rows = torch.arange(nqb, device=ends.device)[None, :]
    return (rows >= lo[:, None]) & (rows <= hi[:, None])


def streaming_block_mask(q_len: int, kv_len: int, block: int, sink, local, device=None) -> torch.Tensor:
    """Bool ``[..., Nqb, Nkb]`` of the sink + local-window rule (block-aligned, causal), for
    ``sink``/``local`` token counts given as ints or broadcastable int tensors ``[...]``."""
    nqb, nkb = cdiv(q_len, block), cdiv(kv_len, block)
    sink = torch.as_tensor(sink, device=device)[..., None, None]
    local = torch.as_tensor(local, device=device)[..., None, None]
    first_q = (torch.arange(nqb, device=device) * block + (kv_len - q_len))[:, None]
    lo = torch.clamp(first_q - local, min=0) // block  # first block of the local window
    hi = last_visible_block(q_len, kv_len, block, block, device)[:, None]
    col = torch.arange(nkb, device=device)[None, :]
    return (((col >= lo) & (col <= hi)) | (col * block < sink)) & (col <= hi)


def visible_pairs(i0, i1, j0, j1, offset, causal: bool = True) -> torch.Tensor:
    """Number of (i, j) with i in [i0, i1), j in [j0, j1) and (if causal) j <= i + offset.

    Closed form, elementwise over broadcastable int64 tensors: the row counts are a clamped
    linear ramp, so no per-row or N x N tensor is needed.
    """
    i0, i1, j0, j1 = (torch.as_tensor(x, dtype=torch.int64) for x in (i0, i1, j0, j1))
    width = (j1 - j0).clamp(min=0)
    rows = (i1 - i0).clamp(min=0)
    if not causal:
        return rows * width
    # row i sees c(i) = clamp(i + offset - j0 + 1, 0, width) keys of the block
    a = j0 - offset  # first row with c >= 1
    b = j1 - 1 - offset  # first row with c == width
    r0 = torch.maximum(i0, a)
    r1 = torch.minimum(i1, b).clamp(min=r0)  # ramp rows [r0, r1): c(i) = i - a + 1
    n = r1 - r0
    ramp = n * (r0 - a + 1) + n * (n - 1) // 2
    full = (i1 - torch.maximum(i0, b)).clamp(min=0) * width
    return ramp + full


def total_visible_pairs(q_len: int, kv_len: int, causal: bool = True) -> int:
    """Query-key pairs visible under bottom-right causality (plain ints: no tensor, no sync)."""
    if not causal:
        return q_len * kv_len
    off = kv_len - q_len  # row i sees min(i + off + 1, kv_len) keys; off >= 0 for causal plans
    return q_len * (off + 1) + q_len * (q_len - 1) // 2
