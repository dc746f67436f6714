"""WHAT each head computes: one method per file, pure functions of (q, k, ctx) -> Plan."""

from . import streaming, token_coverage, topk_blocks, xattention  # noqa: F401  (registration)
from .base import Context, as_context

__all__ = ["Context", "as_context"]
