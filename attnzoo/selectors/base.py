"""What every selector shares: input and config checks (the call context is ``attnzoo.context``)."""

from __future__ import annotations

import torch

from ..context import CallContext
from ..ops._checks import check_qkv

_SELECTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_qk(q, k, ctx: CallContext, causal: bool = True) -> None:
    # fp64 is accepted so that selections can be compared exactly against slow references
    check_qkv(q, k, k, causal=causal, key_padding_mask=ctx.key_padding_mask, dtypes=_SELECTOR_DTYPES)


def check_block(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_fraction(name: str, value) -> None:
    """A threshold in (0, 1]: a float or a per-head list of floats."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name} must not be empty")
    for x in values:
        if not 0 < x <= 1:
            raise ValueError(f"{name} must lie in (0, 1], got {x!r}")
