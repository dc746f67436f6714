"""Plans: *what* each attention head computes, separate from *how* (``attnzoo.ops``).

A selector looks at q/k and writes a plan; an op consumes it. Every plan can

- ``validate(q, k)``  check itself against the tensors it will be applied to (clear errors);
- ``to_mask()``       expand to a dense boolean mask — for tests and small N only;
- ``density()``       fraction of causal-visible query-key pairs that are actually computed;
- ``repr``            describe itself in one readable line.

Causality is bottom-right aligned: with Nq queries and Nk >= Nq keys, query i sees keys
``<= Nk - Nq + i``. Query blocks tile the query tensor's rows from row 0, key blocks tile the
key tensor from key 0; the last block of either may be partial.
"""

from __future__ import annotations

from .block import BlockPlan, DensePlan
from .geometry import (
    causal_mask,
    cdiv,
    last_visible_block,
    streaming_block_mask,
    tail_query_blocks,
    total_visible_pairs,
    visible_pairs,
)
from .head import MODES, HeadPlan, MixedPlan
from .prefill_row import PrefillRow
from .token import TokenPlan

__all__ = ["DensePlan", "BlockPlan", "TokenPlan", "HeadPlan", "MixedPlan", "PrefillRow", "MODES", "visible_pairs",
           "total_visible_pairs", "cdiv", "last_visible_block", "causal_mask", "streaming_block_mask",
           "tail_query_blocks"]
