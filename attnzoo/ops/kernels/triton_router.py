"""Triton: the Elastic router's forward for every KV head of a layer in one launch.

A program owns 16 (batch, KV head) rows (``tl.dot`` needs 16): it sums the first and last
``P`` keys of each row in fp32, then runs both MLPs with the hidden ``4D`` dimension in chunks of
``CH`` columns (``[D, CH]`` weight tiles), so nothing larger than ``[16, max(D, CH)]`` stays live,
and writes the two logits. Dots are fp32 (``ieee``): the decision is a hard argmax, and tf32
rounding would move heads near the boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _router_kernel(K, W1, B1, W2, B2, W3, B3, W4, B4, W5, B5, Z, R, Hkv, N, P, skb, skn, skh, inv_count,
                   D: tl.constexpr, H4: tl.constexpr, CH: tl.constexpr, ROWS_: tl.constexpr):
    r = tl.program_id(0) * ROWS_ + tl.arange(0, ROWS_)
    ok = r < R
    base = K + (r // Hkv).to(tl.int64) * skb + (r % Hkv).to(tl.int64) * skh
    d = tl.arange(0, D)
    ptr = base[:, None] + d[None, :]
    acc = tl.zeros([ROWS_, D], tl.float32)
    for t in range(0, P):
        acc += tl.load(ptr + t * skn, mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.load(ptr + (N - P + t) * skn, mask=ok[:, None], other=0.0).to(tl.float32)
    x = acc * inv_count

    c = tl.arange(0, CH)
    t_acc = tl.zeros([ROWS_, D], tl.float32)
    for c0 in tl.static_range(0, H4, CH):  # task MLP, hidden chunk by chunk
        w1 = tl.load(W1 + (c0 + c)[None, :] * D + d[:, None])  # [D, CH] = W1[c0:c0+CH, :]^T
        h = _silu(tl.dot(x, w1, input_precision="ieee") + tl.load(B1 + c0 + c)[None, :])
        w2 = tl.load(W2 + d[None, :] * H4 + (c0 + c)[:, None])  # [CH, D] = W2[:, c0:c0+CH]^T
        t_acc += tl.dot(h, w2, input_precision="ieee")
    t_out = t_acc + tl.load(B2 + d)[None, :]

    r_acc = tl.zeros([ROWS_, D], tl.float32)
    for c0 in tl.static_range(0, H4, CH):  # router MLP
        w3 = tl.load(W3 + (c0 + c)[None, :] * D + d[:, None])
        h = _silu(tl.dot(t_out, w3, input_precision="ieee") + tl.load(B3 + c0 + c)[None, :])
        w4 = tl.load(W4 + d[None, :] * H4 + (c0 + c)[:, None])
        r_acc += tl.dot(h, w4, input_precision="ieee")
    r_out = _silu(r_acc + tl.load(B4 + d)[None, :])

    z0 = tl.sum(r_out * tl.load(W5 + d)[None, :], 1) + tl.load(B5)
    z1 = tl.sum(r_out * tl.load(W5 + D + d)[None, :], 1) + tl.load(B5 + 1)
    tl.store(Z + r * 2, z0, mask=ok)
    tl.store(Z + r * 2 + 1, z1, mask=ok)


def router_logits(keys: torch.Tensor, weights, *, pool_tokens: int, key_padding_mask=None) -> torch.Tensor:
    """``[B, Hkv, 2]`` fp32 logits from pre-RoPE keys ``[B, N, Hkv, D]`` (no padding, N >= 2P)."""
    B, N, Hkv, D = keys.shape
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    ws = [w.detach().float().contiguous() for w in weights]
    z = torch.empty((B, Hkv, 2), dtype=torch.float32, device=keys.device)
    R = B * Hkv
    _router_kernel[(triton.cdiv(R, ROWS),)](
        keys, *ws, z, R, Hkv, N, pool_tokens, keys.stride(0), keys.stride(1), keys.stride(2),
        1.0 / (2 * pool_tokens), D=D, H4=4 * D, CH=min(64, 4 * D), ROWS_=ROWS, num_warps=4)
    return z.to(weights[0].dtype)
