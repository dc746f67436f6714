"""Elastic Attention's router forward as an op: per KV head, pool the pre-RoPE keys, apply the
task MLP and the router MLP, return two logits (index 1: full attention).

``weights`` are one layer's ten tensors ``(W1, b1, W2, b2, W3, b3, W4, b4, W5, b5)`` in
``nn.Linear`` layout: task ``D -> 4D -> D`` (SiLU between), router ``D -> 4D -> D -> 2`` (SiLU after
the first two). Backends:

- ``torch`` (the reference; also the training path, with gradients to the weights): pooling by two
  slices and a mean, then ``F.linear`` / ``F.silu``;
- ``triton`` (``kernels.triton_router``): pooling, both MLPs and the logits of every head of a
  layer in one launch (the torch path is ~12 launches and ~0.3 ms of host time per layer).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .dispatch import Backend, choose, make_request, register_backend


def pool_keys(keys: torch.Tensor, pool_tokens: int, key_padding_mask=None, dtype=None) -> torch.Tensor:
    """Mean of each head's keys ``[B, N, Hkv, D]`` over the first and last ``pool_tokens`` real
    tokens: ``[B, Hkv, D]``, computed in ``dtype`` (default: the keys')."""
    B, N = keys.shape[0], keys.shape[1]
    if key_padding_mask is None and N >= 2 * pool_tokens:
        # no padding: two slices, not a pass over all N tokens (this runs once per layer); the cast
        # after the gather converts 2 x pool_tokens rows, not all N
        return torch.cat([keys[:, :pool_tokens], keys[:, N - pool_tokens:]], 1).to(dtype or keys.dtype).mean(1)
    keys = keys.to(dtype or keys.dtype)
    real = key_padding_mask if key_padding_mask is not None else torch.ones(B, N, dtype=torch.bool,
                                                                            device=keys.device)
    rank = real.cumsum(-1) - 1  # position among the real tokens
    count = real.sum(-1, keepdim=True)
    take = real & ((rank < pool_tokens) | (rank >= count - pool_tokens))
    w = take.to(keys.dtype)[:, :, None, None]
    return (keys * w).sum(1) / w.sum(1).clamp(min=1)


def mlp_logits(pooled: torch.Tensor, weights) -> torch.Tensor:
    """The two MLPs on pooled keys ``[..., D]`` -> logits ``[..., 2]``."""
    w1, b1, w2, b2, w3, b3, w4, b4, w5, b5 = weights
    t = F.linear(F.silu(F.linear(pooled, w1, b1)), w2, b2)
    r = F.silu(F.linear(F.silu(F.linear(t, w3, b3)), w4, b4))
    return F.linear(r, w5, b5)


def _torch(keys, weights, *, pool_tokens, key_padding_mask):
    return mlp_logits(pool_keys(keys, pool_tokens, key_padding_mask, dtype=weights[0].dtype), weights)


register_backend(Backend(
    op="head_router", name="torch", fn=_torch, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), plan_kinds=("head",), backward=True, lse=False,
    description="torch: pooling by slices and a mean, F.linear / F.silu (the reference; trains)"))


def check_weights(weights, head_dim: int) -> None:
    shapes = [(4 * head_dim, head_dim), (4 * head_dim,), (head_dim, 4 * head_dim), (head_dim,),
              (4 * head_dim, head_dim), (4 * head_dim,), (head_dim, 4 * head_dim), (head_dim,),
              (2, head_dim), (2,)]
    if len(weights) != len(shapes):
        raise ValueError(f"weights must be the router's {len(shapes)} tensors (W1, b1, ..., W5, b5), "
                         f"got {len(weights)}")
    for i, (w, s) in enumerate(zip(weights, shapes, strict=True)):
        if tuple(w.shape) != s:
            raise ValueError(f"weights[{i}] must have shape {s} for head_dim {head_dim}, got {tuple(w.shape)}")


def head_router(keys: torch.Tensor, weights, *, pool_tokens: int, key_padding_mask=None,
                backend: str | None = None) -> torch.Tensor:
    """Logits ``[B, Hkv, 2]`` (fp32 weights give fp32 logits) from pre-RoPE keys ``[B, N, Hkv, D]``."""
    if keys.ndim != 4:
        raise ValueError(f"keys must be [B, N, Hkv, D], got shape {tuple(keys.shape)}")
    check_weights(weights, keys.shape[-1])
    k = keys.transpose(1, 2)  # [B, Hkv, N, D]: the request's view of the keys
    req = make_request("head_router", k, k, k, "head", return_lse=False, key_padding_mask=key_padding_mask,
                       causal=False)
    grad = torch.is_grad_enabled() and (keys.requires_grad or any(w.requires_grad for w in weights))
    req = dataclasses.replace(req, needs_grad=grad)
    impl = choose(req, backend)
    return impl.fn(keys, tuple(weights), pool_tokens=pool_tokens, key_padding_mask=key_padding_mask)
