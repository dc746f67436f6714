"""Where a stack's routers send heads: the share of (batch, KV head) slots each branch gets, per
layer, read from the decisions a patched forward pass made.

    probe = RouteProbe()
    with attnzoo.patch(model, "preset:elastic-fa-xa", probe=probe):
        model(ids)
    probe.share("full")  # mean over routed layers of the share of heads on the "full" branch

Elastic Attention's claim is test-time adaptivity: more heads on full attention for inputs that
need long-range retrieval than for plain text. This is the instrument for it.
"""

from __future__ import annotations

from ..stack import Routed


class RouteProbe:
    """Collects ``{layer: {label: share}}`` from each routed layer's head plan (prefill calls)."""

    def __init__(self):
        self._layers: dict[int, dict[str, float]] = {}

    def __call__(self, layer: int, node, q, k, v, ctx) -> None:
        if ctx.decode or not isinstance(node, Routed) or ctx.cache is None:
            return
        plan = ctx.cache.get(("head_plan", id(node)))
        if plan is not None:  # None: the layer ran dense below its crossover, no router decided
            self._layers[layer] = plan.share()

    def layers(self) -> dict[int, dict[str, float]]:
        return dict(sorted(self._layers.items()))

    def share(self, label: str) -> float | None:
        """Mean over the routed layers of the share of heads on ``label`` (None: nothing routed)."""
        vals = [d.get(label, 0.0) for d in self._layers.values()]
        return sum(vals) / len(vals) if vals else None

    def reset(self) -> None:
        self._layers.clear()
