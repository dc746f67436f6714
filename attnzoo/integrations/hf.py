"""Hugging Face transformers: switch a model's attention function, capture q/k per layer.

transformers calls the registered function as
``fn(module, query [B, Hq, Nq, D], key [B, Hkv, Nk, D], value, attention_mask, scaling=..., **kw)``
and expects ``(out [B, Nq, Hq, D], weights or None)``. A matching mask function must be
registered under the same name, or transformers passes ``attention_mask=None`` and padding is
silently dropped.
"""

from __future__ import annotations

import contextlib
import inspect
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


def autocast_inputs(query, key, value):
    """Under autocast, a model with fp32 weights hands attention q and k in fp32 (its rotary cos / sin
    are fp32, and a product is not autocast) and v in the autocast dtype (a projection is): SDPA
    casts its inputs to the lower precision, and so does this; the ops refuse mixed dtypes."""
    dev = query.device.type
    if not torch.is_autocast_enabled(dev):
        return query, key, value
    dt = torch.get_autocast_dtype(dev)
    return query.to(dt), key.to(dt), value.to(dt)


def key_padding_mask_of(attention_mask, key: torch.Tensor):
    """``[B, Nk]`` real-token mask from the bool ``[B, 1, Nq, Nk]`` mask transformers builds with
    the SDPA mask function, or None when nothing is padded. The last query row sees every key
    before it, so its row is the padding mask whatever the causal pattern above it."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"attnzoo expects the bool SDPA mask, got {attention_mask.dtype}")
    kpm = attention_mask[:, 0, -1, :]
    if kpm.shape[-1] != key.shape[2]:
        raise ValueError(f"attention mask covers {kpm.shape[-1]} keys, key has {key.shape[2]}")
    return None if bool(kpm.all()) else kpm


KEY_SOURCES = "k_proj (k_norm where present), qkv_proj (Phi-3) or query_key_value (GPT-NeoX)"


def _attention_modules(model: nn.Module):
    for mod in model.modules():
        if isinstance(getattr(mod, "layer_idx", None), int) and any(
                hasattr(mod, a) for a in ("k_proj", "qkv_proj", "query_key_value")):
            yield mod


def _key_source(attn: nn.Module, model: nn.Module):
    """``(module, output -> keys [B, N, Hkv, D])``: where a layer's keys exist before RoPE."""
    cfg = model.config.get_text_config()
    d = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or getattr(cfg, "head_dim", None) \
        or cfg.hidden_size // cfg.num_attention_heads
    if hasattr(attn, "k_proj"):
        # k_norm (Qwen3, Gemma 3) normalises each head's last dim; models call it on [B, N, H, D] or
        # on [B, H, N, D], so it is applied here to k_proj's output in one known layout
        norm = getattr(attn, "k_norm", None) or (lambda x: x)
        return attn.k_proj, lambda out: norm(out.reshape(*out.shape[:2], -1, d))
    hq = cfg.num_attention_heads
    if hasattr(attn, "qkv_proj"):  # Phi-3: [q heads | k heads | v heads] along the last dim
        hkv = getattr(cfg, "num_key_value_heads", None) or hq
        return attn.qkv_proj, lambda out: out[..., hq * d:(hq + hkv) * d].reshape(*out.shape[:2], hkv, d)
    # GPT-NeoX: per head [q | k | v], no GQA
    return attn.query_key_value, lambda out: out.reshape(*out.shape[:2], hq, 3 * d)[..., d:2 * d]


@contextlib.contextmanager
def pre_rope_key_hooks(model: nn.Module, store=None):
    """Yield a dict that each forward fills with ``{layer_idx: keys [B, N, Hkv, D]}`` taken after
    the key projection (``KEY_SOURCES``), before RoPE — what head routers read (detached); with
    ``store``, each forward calls ``store(layer_idx, keys)`` instead. Raises ValueError for a model
    whose attention has none of them."""
    keys: dict[int, torch.Tensor] = {}
    put = keys.__setitem__ if store is None else store
    hooks = []
    for attn in _attention_modules(model):
        src, take = _key_source(attn, model)

        def hook(module, args, output, idx=attn.layer_idx, take=take):
            put(idx, take(output.detach()))

        hooks.append(src.register_forward_hook(hook))
    if not hooks:
        raise ValueError(f"{type(model).__name__}: head routers read keys before RoPE, which attnzoo finds at "
                         f"{KEY_SOURCES}; this model's attention has none of them")
    try:
        yield keys
    finally:
        for h in hooks:
            h.remove()


def tensor_parallel_rank(model: nn.Module) -> tuple[int, int]:
    """``(rank, size)`` of ``model``'s tensor-parallel mesh dimension (transformers'
    ``tp_plan``), ``(0, 1)`` for a model on one process."""
    mesh = getattr(model, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is None or "tp" not in names:
        return 0, 1
    return mesh.get_local_rank("tp"), mesh.size(names.index("tp"))


# attention-function arguments that change the math and that attnzoo's ops do not implement
_UNSUPPORTED = {
    "softcap": "attention-logit soft-capping (Gemma 2: set config.attn_logit_softcapping = None to run without it, "
               "as transformers' SDPA path does)",
    "s_aux": "attention sinks as learned logits (gpt-oss)",
    "cu_seq_lens_q": "packed variable-length sequences (pass a padded batch instead)",
}


def refuse_unsupported(model_name: str, kwargs: dict) -> None:
    """Raise for an attention argument that would be silently ignored (a wrong answer)."""
    for key, what in _UNSUPPORTED.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"{model_name} asks attention for {key}={kwargs[key]!r}: attnzoo stacks do not implement "
                             f"{what}")


def sliding_window_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """The model's own windowed attention (transformers' SDPA function with the window mask it built)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def cache_keyword(model) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` in newer transformers (which deprecate
    ``past_key_values``, removal announced for 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward pass returned, under either keyword (``cache_keyword``)."""
    return out["cache"] if "cache" in out else out.past_key_values
