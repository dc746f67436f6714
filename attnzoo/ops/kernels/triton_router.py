"""Triton: the Elastic router's forward for every KV head of a layer in one launch.

One program per (batch, KV head) row: it sums the first and last ``P`` keys in ``[T, D]`` tiles
(fp32), then runs both MLPs as matrix-vector products with the hidden ``4D`` dimension in chunks of
``CH`` (``[D, CH]`` weight tiles, so nothing larger stays live) and writes the two logits. All
arithmetic is fp32: the decision is a hard argmax, and tf32 rounding would move heads near the
boundary. The rows are few (B x Hkv), so each program's latency is what counts: the token loop
reads whole tiles, not one token per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS = 128  # keys per pooling tile


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _window_sum(ptr, first, P, skn, T: tl.constexpr, D: tl.constexpr):
    """fp32 sum over keys ``first .. first + P - 1`` of one row: ``[D]``."""
    t = tl.arange(0, T)
    d = tl.arange(0, D)
    acc = tl.zeros([T, D], tl.float32)
    for t0 in range(0, P, T):
        pos = (first + t0 + t).to(tl.int64)
        acc += tl.load(ptr + pos[:, None] * skn + d[None, :], mask=(t0 + t)[:, None] < P, other=0.0).to(tl.float32)
    return tl.sum(acc, 0)


@triton.jit
def _matvec_chunks(x, W_IN, B_IN, W_OUT, D: tl.constexpr, H4: tl.constexpr, CH: tl.constexpr):
    """``W_OUT @ silu(W_IN @ x + B_IN)`` for ``x`` ``[D]`` (nn.Linear layouts), hidden in chunks."""
    d = tl.arange(0, D)
    c = tl.arange(0, CH)
    out = tl.zeros([D], tl.float32)
    for c0 in tl.static_range(0, H4, CH):
        w_in = tl.load(W_IN + (c0 + c)[None, :] * D + d[:, None])  # [D, CH] = W_IN[c0:c0+CH, :]^T
        h = _silu(tl.sum(x[:, None] * w_in, 0) + tl.load(B_IN + c0 + c))
        w_out = tl.load(W_OUT + d[None, :] * H4 + (c0 + c)[:, None])  # [CH, D] = W_OUT[:, c0:c0+CH]^T
        out += tl.sum(h[:, None] * w_out, 0)
    return out


@triton.jit(do_not_specialize=["P1", "S2", "P2"])  # lengths: see _triton.py
def _router_kernel(K, W1, B1, W2, B2, W3, B3, W4, B4, W5, B5, Z, Hkv, P1, S2, P2, skb, skn, skh, inv_count,
                   D: tl.constexpr, H4: tl.constexpr, CH: tl.constexpr, T: tl.constexpr):
    r = tl.program_id(0)
    row = K + (r // Hkv).to(tl.int64) * skb + (r % Hkv).to(tl.int64) * skh
    x = (_window_sum(row, 0, P1, skn, T, D) + _window_sum(row, S2, P2, skn, T, D)) * inv_count
    d = tl.arange(0, D)
    t_out = _matvec_chunks(x, W1, B1, W2, D, H4, CH) + tl.load(B2 + d)  # task MLP
    r_out = _silu(_matvec_chunks(t_out, W3, B3, W4, D, H4, CH) + tl.load(B4 + d))  # router MLP
    z0 = tl.sum(r_out * tl.load(W5 + d), 0) + tl.load(B5)
    z1 = tl.sum(r_out * tl.load(W5 + D + d), 0) + tl.load(B5 + 1)
    tl.store(Z + r * 2, z0)
    tl.store(Z + r * 2 + 1, z1)


def router_logits(keys: torch.Tensor, weights, *, pool_tokens: int, key_padding_mask=None) -> torch.Tensor:
    """``[B, Hkv, 2]`` logits from pre-RoPE keys ``[B, N, Hkv, D]`` (no padding). Where the two
    windows of ``pool_tokens`` overlap (N < 2P) each key is pooled once, as in the torch path."""
    B, N, Hkv, D = keys.shape
    p1 = min(pool_tokens, N)
    s2 = max(N - pool_tokens, p1)  # the last window, minus what the first one already holds
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    # the kernel reads raw fp32 rows: shipped weights already are (no copy, no launch per call)
    ws = weights if all(w.dtype == torch.float32 and w.is_contiguous() for w in weights) else \
        [w.detach().float().contiguous() for w in weights]
    z = torch.empty((B, Hkv, 2), dtype=torch.float32, device=keys.device)
    _router_kernel[(B * Hkv,)](
        keys, *ws, z, Hkv, p1, s2, N - s2, keys.stride(0), keys.stride(1), keys.stride(2),
        1.0 / (p1 + N - s2), D=D, H4=4 * D, CH=min(64, 4 * D), T=min(TOKENS, triton.next_power_of_2(pool_tokens)),
        num_warps=4)
    return z.to(weights[0].dtype)
