"""Routers: selectors at head granularity. ``router(q, k, ctx, labels) -> HeadPlan`` assigns each
(batch element, KV head) one of a Routed node's branch labels."""

from . import elastic, table  # noqa: F401  (registration)
