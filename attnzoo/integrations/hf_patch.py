"""``attnzoo.patch``: a stack as a Hugging Face model's attention, per thread.

One model may serve several threads at once, each inside its own ``patch`` with its own stack:
the model gets one attention function (registered with the first ``patch`` and restored after
the last), and each call runs the stack of the thread (``contextvars`` context) that makes it.
Everything a call keeps between layers (router decisions for decoding, pre-RoPE keys, the density
meter, the recall probe) belongs to that thread's patch. A thread with no patch of its own runs
the only active one, and is refused while several threads have the model patched.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from .hf import (
    autocast_inputs,
    decoder_layers,
    key_padding_mask_of,
    pre_rope_key_hooks,
    refuse_unsupported,
    sliding_window_attention,
    tensor_parallel_rank,
    use_attention,
)

__all__ = ["patch"]


@dataclass
class _Binding:
    """One ``patch``: its stack and what its calls keep between layers."""

    stack: object
    meter: object | None
    probe: object | None
    needs_keys: bool
    tp: tuple[int, int]
    static_decode: bool = False
    caches: dict = field(default_factory=dict)  # layer -> router decisions of the current prompt
    keys: dict = field(default_factory=dict)  # layer -> pre-RoPE keys of the current forward


@dataclass
class _Patched:
    """A model's shared attention function and hooks, while any thread has it patched."""

    bindings: list = field(default_factory=list)
    exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    hooks: contextlib.ExitStack | None = None


_LOCK = threading.Lock()
_PATCHED: dict[int, _Patched] = {}  # id(model) -> state, while patched
_ACTIVE: contextvars.ContextVar[dict] = contextvars.ContextVar("attnzoo_patch", default=None)


def _binding(model: nn.Module, state: _Patched) -> _Binding:
    own = (_ACTIVE.get() or {}).get(id(model))
    if own is not None:
        return own
    with _LOCK:
        active = list(state.bindings)
    if len(active) == 1:
        return active[0]
    raise RuntimeError(f"{type(model).__name__} is patched by {len(active)} attnzoo.patch blocks in other threads, "
                       "none in this one: call the model inside this thread's own `with attnzoo.patch(model, stack)`")


def _attention_fn(model: nn.Module, state: _Patched):
    name = type(model).__name__

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from ..stack import CallContext

        if dropout:
            raise ValueError(f"attnzoo stacks implement no attention dropout, got dropout={dropout}; "
                             "set the model's attention_dropout to 0")
        refuse_unsupported(name, kwargs)
        window = kwargs.get("sliding_window")
        if window is not None and (key.shape[2] >= window or query.shape[2] < key.shape[2]):
            # a sliding-window layer (Mistral, Gemma 2/3, Phi-3, Qwen with use_sliding_window) is already
            # local: it keeps the model's own windowed attention, and the stack runs the global layers.
            # Decode steps go there too: a sliding cache drops its oldest tokens, so a stack would put a
            # sink or a plan on whatever token the cache now starts with
            return sliding_window_attention(module, query, key, value, attention_mask, scaling, **kwargs)
        query, key, value = autocast_inputs(query, key, value)
        b = _binding(model, state)
        layer = module.layer_idx
        decode = query.shape[2] == 1 and key.shape[2] > 1
        static = decode and b.static_decode
        if static:  # every slot of the cache, the written ones marked: nothing read on the host
            kpm = written_slots(attention_mask, key)
        else:
            kpm = key_padding_mask_of(attention_mask, key)
            if kpm is not None and query.shape[2] < key.shape[2]:
                key, value, kpm = trim_unwritten_slots(key, value, kpm)
            elif attention_mask is None and 1 < query.shape[2] < key.shape[2]:
                # transformers leaves out a mask that is plain causal and then means SDPA's top-left rule:
                # a static cache's prefill (the keys past the prompt are unwritten slots)
                key, value = key[:, :, :query.shape[2]], value[:, :, :query.shape[2]]
        if not decode:
            b.caches[layer] = {}  # a new prompt: routers decide again
        ctx = CallContext(key_padding_mask=kpm, layer_idx=layer, scale=scaling,
                          pre_rope_keys=b.keys.get(layer), cache=b.caches.setdefault(layer, {}), decode=decode,
                          meter=b.meter, static_decode=static)
        rank, size = b.tp
        if size > 1:  # this rank holds an even slice of the layer's KV heads (HF's colwise plan)
            ctx.kv_head_offset, ctx.kv_heads_total = rank * key.shape[1], size * key.shape[1]
        out = b.stack(layer, query, key, value, ctx)
        if b.probe is not None:
            b.probe(layer, b.stack.node_for(layer), query, key, value, ctx)
        return out.transpose(1, 2).contiguous(), None

    return attention


def written_slots(attention_mask, key):
    """``[B, Nk]`` bool, True at the slots a decode step may read (written, not padding), for a
    static decode: the mask's last row as it is, without ``key_padding_mask_of``'s host read that
    drops an all-true mask. A static cache always masks its unwritten slots; no mask (a dynamic
    cache, nothing padded) means every key is real and the query is the last."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape[-1] != key.shape[2]:
        raise ValueError(f"static_decode: a decode step needs transformers' bool mask over every cache slot "
                         f"([B, 1, 1, {key.shape[2]}]), got {attention_mask.dtype} {tuple(attention_mask.shape)}")
    return attention_mask[:, 0, -1, :]


def static_decode_refusal(stack) -> str | None:
    """Why ``stack`` cannot decode a static cache by the mask (``patch(..., static_decode=True)``), or
    None: what each layer runs at decode must be dense or a selector that places its pages by the mask
    (``decode_by_mask``: Quest). Others place blocks from the last key, which needs the unwritten slots
    cut first (a host read); routers split a decode step's heads on the host."""
    from ..stack import Branch, Compressed, Phased

    def decode_path(node):
        if isinstance(node, Phased):
            yield from decode_path(node.decode)
        elif isinstance(node, Compressed):  # decode runs the inner node on the uncompressed cache
            yield from decode_path(node.inner)
        else:
            yield node

    for top in [stack.default, *stack.layers.values(), *stack.relative.values()]:
        for node in decode_path(top):
            if not isinstance(node, Branch):
                return f"a {type(node).__name__} node decodes through a host-side split"
            if node.places_blocks(True) and not getattr(node.selector, "decode_by_mask", False):
                return f"the {type(node.selector).__name__} selector places its decode blocks from the last key"
    return None


def trim_unwritten_slots(key, value, kpm):
    """A static cache (``cache_implementation="static"``) hands attention every slot of the cache,
    those not written yet masked at the end. Stacks place the queries at the last keys (bottom-right
    causal, as a dynamic cache gives them), so the unwritten slots are cut first: otherwise a
    prefill's rows would see later tokens of the prompt and a decode step's window or pages would
    sit on empty slots. Reading where they start is one host read, only for calls with fewer
    queries than keys and a mask (a padded decode step already makes one)."""
    written = kpm.any(0)  # [Nk]: a slot some sequence has written
    if bool(written[-1]):
        return key, value, kpm
    end = int(torch.nonzero(written).max()) + 1 if bool(written.any()) else 1
    kpm = kpm[:, :end]
    return key[:, :, :end], value[:, :, :end], None if bool(kpm.all()) else kpm


def _store_keys(model: nn.Module, state: _Patched):
    def store(layer, keys):
        b = _binding(model, state)
        if b.needs_keys:
            b.keys[layer] = keys
    return store


@contextlib.contextmanager
def patch(model: nn.Module, stack, meter=None, probe=None, static_decode: bool = False):
    """Run ``model`` with the attention ``stack`` (anything ``attnzoo.build`` takes) inside the
    block, in this thread; the previous attention implementation is restored when the last thread's
    block exits, also after an exception.

    Each attention call finds its layer through ``module.layer_idx`` and runs that layer's node.
    Routers that need pre-RoPE keys get them from a forward hook on ``k_proj`` (``k_norm`` where
    the model has one). A call with one query against a longer cache is a decode step: routers
    reuse their prefill decision for the layer, and prefill-only selectors attend densely.
    ``meter`` (an ``attnzoo.stack.DensityMeter``) collects the attention density used per layer.
    ``probe``: called as ``probe(layer_idx, node, q, k, v, ctx)`` after each layer's attention
    (``attnzoo.eval.recall.RecallProbe`` measures what each layer's node keeps).
    Several threads may patch one model with different stacks and call it at once (module doc).
    ``static_decode``: decode steps on a ``StaticCache`` read every slot, the written ones marked by
    the mask, with no host read (a step can then be captured in a CUDA graph and replayed): each
    layer's decode part must be dense or Quest (``static_decode_refusal``); a left-padded batch is
    refused at its first decode step.
    """
    from ..stack import Routed, build

    stack = build(stack).for_model(model)
    if len(decoder_layers(model)) != model.config.get_text_config().num_hidden_layers:
        raise ValueError(f"{type(model).__name__}: {len(decoder_layers(model))} decoder layers, but its config "
                         f"says {model.config.get_text_config().num_hidden_layers}")
    needs_keys = any(isinstance(n, Routed) and n.router.needs_pre_rope_keys for n in stack.nodes())
    tp = tensor_parallel_rank(model)
    if meter is not None and tp[1] > 1:
        meter.group = model._device_mesh.get_group("tp")  # densities average over every rank's heads
    if static_decode and (why := static_decode_refusal(stack)):
        raise ValueError(f"static_decode=True: stack {stack.name!r} cannot decode a static cache by its mask: {why} "
                         "(decode parts that can: {op: dense}, or a quest selector)")
    binding = _Binding(stack, meter, probe, needs_keys, tp, static_decode=bool(static_decode))
    with _LOCK:
        state = _PATCHED.get(id(model))
        first = state is None
        if first:
            state = _PATCHED[id(model)] = _Patched()
        state.bindings.append(binding)
        try:
            if first:
                prefix = f"attnzoo_{re.sub(r'[^A-Za-z0-9_]', '_', stack.name)}"
                state.exit.enter_context(use_attention(model, _attention_fn(model, state), prefix=prefix))
            if needs_keys and state.hooks is None:  # raises for a model with no key projection to hook
                state.hooks = contextlib.ExitStack()
                state.hooks.enter_context(pre_rope_key_hooks(model, store=_store_keys(model, state)))
                state.exit.push(state.hooks)
        except BaseException:
            _release(model, state, binding)
            raise
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), id(model): binding})
    try:
        yield model
    finally:
        _ACTIVE.reset(token)
        with _LOCK:
            _release(model, state, binding)


def _release(model: nn.Module, state: _Patched, binding: _Binding) -> None:
    """Drop ``binding``; the last one out restores the model (call with ``_LOCK`` held)."""
    state.bindings.remove(binding)
    if not state.bindings:
        del _PATCHED[id(model)]
        state.exit.close()
