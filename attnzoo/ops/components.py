"""Ops as registered components, so stacks can name them: ``{op: dense}``."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import suggest
from ..plans import BlockPlan, DensePlan, TokenPlan
from ..registry import register
from . import token_sparse
from .block_sparse import block_sparse
from .dense import dense, row_skipping
from .dispatch import backends


def _check_backend(backend, op: str) -> None:
    """A forced backend must exist for the op that runs it; checked when the stack is built, not
    at the first call. (Whether it can run on this machine is dispatch's call, made per request.)"""
    if backend is None:
        return
    names = [b.name for b in backends(op)]
    if backend not in names:
        raise ValueError(f"backend {backend!r} is not a backend of op {op!r}{suggest(backend, names)}. "
                         f"Registered: {sorted(names)}")


@register("op", "dense")
@dataclass
class Dense:
    """Dense causal attention; accepts no plan or a DensePlan."""

    backend: str | None = None
    plan_kinds = ("dense",)
    takes_row_lengths = True  # see attnzoo.ops.dense

    def __post_init__(self):
        _check_backend(self.backend, "dense")

    def skips_rows(self, q, k) -> bool:
        """Whether a call with ``row_lengths`` skips the padded rows on the device (no host read)."""
        return row_skipping(q, k, backend=self.backend)

    def __call__(self, q, k, v, plan=None, *, key_padding_mask=None, scale=None, return_lse=False,
                 row_lengths=None):
        if plan is not None and not isinstance(plan, DensePlan):
            raise TypeError(f"op 'dense' takes a DensePlan or None, got {type(plan).__name__}")
        causal = plan.causal if plan is not None else True
        return dense(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                     return_lse=return_lse, backend=self.backend, row_lengths=row_lengths)


@register("op", "block_sparse")
@dataclass
class BlockSparse:
    """Attention over the key blocks of a BlockPlan."""

    backend: str | None = None
    plan_kinds = ("block",)

    def __post_init__(self):
        _check_backend(self.backend, "block_sparse")

    def __call__(self, q, k, v, plan, *, key_padding_mask=None, scale=None, return_lse=False):
        if not isinstance(plan, BlockPlan):
            raise TypeError(f"op 'block_sparse' needs a BlockPlan, got {type(plan).__name__}")
        return block_sparse(q, k, v, plan, key_padding_mask=key_padding_mask, scale=scale,
                            return_lse=return_lse, backend=self.backend)


@register("op", "token_sparse")
@dataclass
class TokenSparse:
    """Compress to the TokenPlan's kept rows, dense causal attention, decompress."""

    backend: str | None = None
    plan_kinds = ("token",)

    def __post_init__(self):
        _check_backend(self.backend, "dense")

    def __call__(self, q, k, v, plan, *, key_padding_mask=None, scale=None, return_lse=False):
        if not isinstance(plan, TokenPlan):
            raise TypeError(f"op 'token_sparse' needs a TokenPlan, got {type(plan).__name__}")
        return token_sparse.attention(q, k, v, plan, key_padding_mask=key_padding_mask,
                                      scale=scale, return_lse=return_lse, backend=self.backend)
