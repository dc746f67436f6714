"""Running one layer's node, with left padding made invisible to its selectors."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..context import CallContext
from ..plans import HeadPlan, PrefillRow
from .nodes import Node
from .padding import StartAligned, first_real


def run(node: Node, q, k, v, ctx: CallContext) -> torch.Tensor:
    """Run one layer's ``node``, with left padding made invisible to its selectors.

    Plans place blocks, strides and sinks from each sequence's first token. A left-padded sequence
    would put them on its padding, so the layer would compute something other than the prompt
    alone. Prefill (Nq == Nk) rolls every sequence to start at row 0 on the device (see
    ``ops.padding``); a call with Nq < Nk that places blocks (chunked prefill, or a decode step of
    a selector that keeps a plan, like ``streaming``) runs one sequence at a time on its real
    suffix, which costs one host sync. Nodes that place nothing run unchanged.
    """
    kpm = ctx.key_padding_mask
    if kpm is None or not node.places_blocks(ctx.decode) or ctx.static_decode:
        # (a static decode's nodes place their pages by the mask: attnzoo.patch checks which may)
        return node(q, k, v, ctx)
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    keys = ctx.pre_rope_keys
    if Nq == Nk:
        al = StartAligned(kpm)
        sub = replace(ctx, key_padding_mask=al.mask, pre_rope_keys=None if keys is None else al.align(keys, 1),
                      starts_aligned=True)
        return al.restore(node(al.align(q), al.align(k), al.align(v), sub))
    outs = []
    for b, start in enumerate(first_real(kpm).tolist()):
        s = min(start, Nk - Nq)  # query rows are never cut
        cache = None if ctx.cache is None else {key: val.select(b) if isinstance(val, (HeadPlan, PrefillRow)) else val
                                                for key, val in ctx.cache.items()}
        # starts_aligned: the cut starts at the first real token, or at the first query row where the
        # sequence has fewer real tokens than queries (its padded rows are ignored)
        sub = replace(ctx, key_padding_mask=kpm[b:b + 1, s:], cache=cache, share=ctx.share / B,
                      pre_rope_keys=None if keys is None else keys[b:b + 1, s:], starts_aligned=True)
        outs.append(node(q[b:b + 1], k[b:b + 1, :, s:], v[b:b + 1, :, s:], sub))
    return torch.cat(outs)
