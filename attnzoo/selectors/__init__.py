"""WHAT each head computes: one method per file, pure functions of (q, k, ctx) -> Plan."""

from ..context import as_context  # what a selector normalises its ctx argument with
from . import prefill_blocks, quest, streaming, token_coverage, topk_blocks, xattention  # noqa: F401  (registration)

__all__ = ["as_context"]
