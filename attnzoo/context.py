"""The one context type: what an attention call knows besides q, k and v.

The stack builds it per call (``attnzoo.integrations.hf`` from the model's attention mask and
layer); selectors read the fields that concern them (``key_padding_mask``, ``layer_idx``,
``active_heads``) and stay pure functions of ``(q, k, ctx)``; routers and nodes read the rest.
A leaf module: it imports nothing from attnzoo, so every layer can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CallContext:
    key_padding_mask: torch.Tensor | None = None  # [B, Nk], True = real token
    layer_idx: int | None = None
    # [B, Hkv] bool on q's device: the (batch, KV head) pairs whose plan rows will be used (a routed
    # layer sends the others to another branch). A selector may skip scoring the rest; their plan
    # rows are then valid but unspecified. None: every row is used.
    active_heads: torch.Tensor | None = None
    scale: float | None = None
    pre_rope_keys: torch.Tensor | None = None  # [B, N, Hkv, D], for routers that need them
    cache: dict | None = None  # per-layer state: router decisions made at prefill, reused while decoding
    decode: bool = False  # one new query against a cache
    meter: object | None = None  # an attnzoo.stack.DensityMeter
    share: float = 1.0  # fraction of the layer's (batch, head) slots this call covers
    # multiplier from enclosing compressed nodes: a number, or a function the meter calls when read
    density_scale: object = 1.0
    # tensor parallelism (heads sharded): this call's KV heads are global heads
    # [kv_head_offset, kv_head_offset + Hkv) of kv_heads_total; None: the whole layer is local
    kv_head_offset: int = 0
    kv_heads_total: int | None = None
    # True where the caller (the stack's runner) has rolled left padding away, so every sequence's
    # first real token is position 0. Selectors place blocks, strides and sinks from position 0; a
    # registered selector called with a left-padded mask and without this flag raises (see
    # attnzoo.contracts.check_starts_at_zero) instead of putting its sink on the padding.
    starts_aligned: bool = False
    # called with the plan a Branch computes (a Phased node keeps the prompt's plan this way for a
    # decode part that reuses it); None: nobody asks
    keep_plan: object | None = None
    # a decode step on a static cache's every slot (``attnzoo.patch(..., static_decode=True)``): the
    # key padding mask marks the written slots and the query sits at the last of them, not at the last
    # key; nothing may read the device on the host (the step is meant to be captured in a CUDA graph)
    static_decode: bool = False
    # [B, H] (H dividing the query heads) or None: Token Sparse's compressed tensors padded to a static
    # width hold head h's real rows first; rows at or past row_lengths[b, h] are padded slots whose
    # output is dropped, so a dense op may skip them (``attnzoo.ops.dense``'s ``row_lengths``)
    row_lengths: torch.Tensor | None = None
    # the caller asks the selector for a plan whose shapes depend on the input's shapes only (sized
    # without a host read): a compressed node whose inner attention skips padded rows sets it
    static_shapes: bool = False

    def record(self, density) -> None:
        """Add this call's density to the meter (prefill only): a number, a 0-dim tensor, or a
        zero-argument function the meter calls when it is read (the hot path computes nothing)."""
        if self.meter is None or self.decode:
            return
        scale = self.density_scale
        if not callable(scale) and not isinstance(scale, torch.Tensor) and scale == 1.0:
            self.meter.add(self.layer_idx, self.share, density)
        else:
            self.meter.add(self.layer_idx, self.share, lambda: deferred_value(scale) * deferred_value(density))


def deferred_value(x):
    """A meter entry's value: ``x()`` for a deferred one, else ``x``."""
    return x() if callable(x) else x


def as_context(ctx) -> CallContext:
    """``None`` (an empty context), a CallContext, or a dict of its fields."""
    if ctx is None:
        return CallContext()
    if isinstance(ctx, CallContext):
        return ctx
    if isinstance(ctx, dict):
        return CallContext(**ctx)
    raise TypeError(f"ctx must be an attnzoo CallContext, a dict or None, got {type(ctx).__name__}")
