"""Decode by the prefill's plan: each generated token reads the key blocks the prompt's last query
block read, plus every block written after the prompt (issue 39's "reuse of the prefill plan").

For a node's ``decode`` part: ``{selector: {name: xattention}, op: block_sparse, decode: {selector:
{name: prefill_blocks}, op: block_sparse}}``. While the prompt runs, the node hands its plan to the
``Phased`` node, which keeps that plan's row at each sequence's last real query in the layer's
cache (``attnzoo.plans.PrefillRow``); each decode step builds its plan from it on the device. Where
no row was kept (the prompt ran dense, its plan was not a block plan, or a streaming prompt ran as a
range rule, which makes no plan) or for a prefill, it returns a dense plan: nothing is left out that
the prefill did not leave out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..context import as_context
from ..plans import DensePlan, PrefillRow
from ..registry import register
from .base import check_qk

CACHE_KEY = "prefill_row"


@register("selector", "prefill_blocks")
@dataclass
class PrefillBlocks:
    plan_kind: ClassVar[str] = "block"
    decode: ClassVar[str] = "plan"  # a plan over the cache while decoding (from the prompt's)
    prefill: ClassVar[str] = "dense"  # decode only: a prompt's plan is dense
    keeps_prefill_plan: ClassVar[bool] = True  # Phased keeps the prefill plan's last row for it

    def __call__(self, q, k, ctx=None):
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        row = (ctx.cache or {}).get(CACHE_KEY)
        if q.shape[2] != 1 or not isinstance(row, PrefillRow) or row.indices.shape[0] != q.shape[0]:
            return DensePlan(q.shape[2], k.shape[2])
        return row.decode_plan(k.shape[2])
