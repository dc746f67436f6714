"""WHAT each head computes: one method per file, pure functions of (q, k, ctx) -> Plan."""

from . import streaming, token_coverage, topk_blocks, xattention  # noqa: F401  (registration)
from .base import Context

__all__ = ["Context"]
