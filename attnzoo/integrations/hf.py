"""Hugging Face transformers: switch a model's attention function, capture q/k per layer.

transformers calls the registered function as
``fn(module, query [B, Hq, Nq, D], key [B, Hkv, Nk, D], value, attention_mask, scaling=..., **kw)``
and expects ``(out [B, Nq, Hq, D], weights or None)``. A matching mask function must be
registered under the same name, or transformers passes ``attention_mask=None`` and padding is
silently dropped.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

_counter = itertools.count()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``model.model.layers`` for Llama/Qwen/Mistral-style models)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n):
            return mod
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


@contextlib.contextmanager
def use_attention(model: nn.Module, fn, prefix: str = "attnzoo"):
    """Run ``model`` with attention function ``fn`` inside the block; restore it on exit, also
    when the block raises. The function is registered under a unique name with the SDPA mask
    function, so padded batches arrive as a bool ``[B, 1, Nq, Nk]`` mask (True = attend)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = f"{prefix}_{next(_counter)}"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield name
    finally:
        model.set_attn_implementation(previous)
        # the interfaces are global registries; drop our entries so names do not pile up
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


@torch.no_grad()
def capture_qk(model: nn.Module, **inputs) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model(**inputs)`` once and return ``{layer_idx: (q, k)}`` as the attention function
    sees them (after RoPE, K/V not repeated). Attention itself is computed by SDPA as usual."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query.detach(), key.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with use_attention(model, fn, prefix="attnzoo_capture"):
        model(**inputs, use_cache=False)
    return captured
