"""The node base, the density meter, and the Branch node (one selector -> plan -> op). The other
node kinds are ``routed.py`` and ``compressed.py`` beside it; ``attnzoo.stack`` exports them all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..caches import shape_cache
from ..context import CallContext
from ..ops import dense as dense_op
from ..ops import mixed as mixed_op
from ..ops.mixed import fused_backend
from ..plans import DensePlan
from ..registry import to_config
from ..settings import value_checks
from .executor import HeadMode, uniform_plan

__all__ = ["CallContext", "DensityMeter", "Node", "Branch", "density_of", "head_mode", "dense_below_applies"]


class DensityMeter:
    """Attention density actually used during prefill, per layer: each Branch adds
    ``share x density`` where share is the fraction of the layer's (batch, head) slots the call
    covers; dense work counts 1.0, compressed nodes multiply in their token plan's density.

    Recording is lazy: a call hands over its plan's density as a zero-argument function (or a
    number), and the meter evaluates them when ``layers`` or ``mean()`` is read. A metered prefill
    therefore runs the same kernels as an unmetered one (no density reductions, no host sync in
    the hot path) and can be timed as is; reading afterwards does the work once. The plans stay
    referenced until then: ``reset()`` between prompts."""

    def __init__(self, group=None):
        self._entries: dict[int, list] = {}
        # a torch.distributed group whose ranks each hold a slice of every layer's heads (set by
        # attnzoo.patch under tensor parallelism): reading averages over the ranks, a collective
        # every rank must make
        self.group = group

    def add(self, layer, share, density) -> None:
        """``share x density`` for ``layer``; ``density`` may be a number, a 0-dim tensor or a
        function returning one (called when the meter is read)."""
        self._entries.setdefault(-1 if layer is None else layer, []).append((share, density))

    def _sums(self) -> dict[int, float]:
        out = {}
        for layer, entries in self._entries.items():
            total = 0.0
            for share, density in entries:
                total = total + share * (density() if callable(density) else density)
            out[layer] = float(total)
        return out

    @property
    def layers(self) -> dict[int, float]:
        sums = self._sums()
        if self.group is None:
            return sums
        import torch.distributed as dist

        keys = sorted(sums)
        dev = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        local = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=dev)
        dist.all_reduce(local, group=self.group)
        return {k: float(v) / dist.get_world_size(self.group) for k, v in zip(keys, local, strict=True)}

    def mean(self) -> float:
        layers = self.layers
        return sum(layers.values()) / len(layers) if layers else float("nan")

    def reset(self) -> None:
        self._entries.clear()


def density_of(plan):
    """A plan's mean density without a host sync: a 0-dim device tensor (1.0 for dense plans)."""
    if isinstance(plan, DensePlan):
        return 1.0
    return plan.density(reduce=False).mean()


class Node:
    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to_config(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def children(self) -> list[Node]:
        return []

    def walk(self):
        yield self
        for c in self.children():
            yield from c.walk()

    def places_blocks(self, decode: bool) -> bool:
        """Whether a call of this kind lays anything out by position (a plan grid, a sink, token
        choices): what left padding would shift. While decoding only selectors that keep a plan
        over the cache do."""
        return any(c.places_blocks(decode) for c in self.children())

    def skips_rows(self, q, k) -> bool:
        """Whether this node, called with ``ctx.row_lengths``, skips each head's padded rows on the
        device (no host read): a compressed node then pads to a static width."""
        return False

    def launches_once(self, q, k) -> bool:
        """Whether a call on q/k is one dense attention launch: a CUDA graph has nothing to save
        there (its input copies would be the only change), so such calls are not captured."""
        return False

    def capture_refusal(self, q, k, ctx=None) -> str | None:
        """Why a call of this node on q/k (under ``ctx``, when known) cannot be captured in a CUDA
        graph (a host read on its path), or None. Declared, not discovered: a capture that fails
        part-way can leave the device's allocator and generator in capture mode."""
        return next((why for c in self.children() if (why := c.capture_refusal(q, k, ctx))), None)


@dataclass
class Branch(Node):
    op: object
    selector: object | None = None
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which attention runs dense

    def places_blocks(self, decode: bool) -> bool:
        return self.selector is not None and (not decode or self.selector.decode == "plan")

    def launches_once(self, q, k) -> bool:
        return dense_below_applies(self.dense_below, k) or (self.selector is None and self.op.plan_kinds == ("dense",))

    def capture_refusal(self, q, k, ctx=None) -> str | None:
        if value_checks(q.device):
            return "value checks read tensors on the host (check_values)"
        return None

    def _takes_row_lengths(self) -> bool:  # an op component that accepts ctx.row_lengths, no selector
        return self.selector is None and getattr(self.op, "takes_row_lengths", False)

    def skips_rows(self, q, k) -> bool:
        return self._takes_row_lengths() and self.op.skips_rows(q, k)

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if self.selector is None or dense_below_applies(self.dense_below, k):
            ctx.record(1.0)
            if self.selector is not None:
                return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
            rows = {"row_lengths": ctx.row_lengths} if self._takes_row_lengths() else {}
            return self.op(q, k, v, None, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale, **rows)
        if ctx.decode and self.selector.decode == "dense":
            # prefill-only methods attend densely over the whole cache while decoding
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        ranged = self._as_ranges(q, k, v, ctx)
        if ranged is not None:
            return ranged
        with torch.no_grad():  # plans are discrete; a plugin selector must not build a graph either
            plan = self.selector(q, k, ctx)
        if ctx.meter is not None:
            ctx.record(functools.partial(density_of, plan))
        if ctx.keep_plan is not None:
            ctx.keep_plan(plan)
        if isinstance(plan, DensePlan) and "dense" not in self.op.plan_kinds:
            return dense_op(q, k, v, causal=plan.causal, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        return self.op(q, k, v, plan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)

    def _as_ranges(self, q, k, v, ctx: CallContext):
        """A selector whose pattern is a range rule (streaming) runs as one mixed launch over
        ranges where a single-launch backend takes the call: no index lists, no selection."""
        mode = head_mode(self)
        if mode is None or mode.kind != "streaming":
            return None
        backend = fused_backend(q, k, v, q.shape[1], mode.block_size, key_padding_mask=ctx.key_padding_mask)
        if backend is None:
            return None
        plan = uniform_plan(mode, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
        if ctx.meter is not None:
            ctx.record(_uniform_density(mode, q.shape[2], k.shape[2]))
        return mixed_op(q, k, v, plan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale, backend=backend.name)

    def to_config(self) -> dict:
        out = {}
        if self.selector is not None:
            out["selector"] = to_config(self.selector)
        out["op"] = to_config(self.op)
        if self.dense_below:
            out["dense_below"] = dict(self.dense_below)
        return out


@shape_cache(64)
def _uniform_density(mode: HeadMode, q_len: int, kv_len: int) -> float:
    """Density of a range rule: it depends on shapes only, so it is computed once on the CPU."""
    return uniform_plan(mode, 1, 1, q_len, kv_len, torch.device("cpu")).density()


def head_mode(node) -> HeadMode | None:
    """``node`` as a mixed-plan head mode, or None if it cannot run as one."""
    if not isinstance(node, Branch) or node.op.backend is not None:
        return None  # other node types, or a branch whose user forced an op backend
    kinds = node.op.plan_kinds
    if node.selector is None:
        return HeadMode("dense") if "dense" in kinds else None
    if "block" not in kinds or node.selector.plan_kind != "block":
        return None
    if node.selector.ranges is not None:  # declared capabilities (attnzoo.contracts)
        r = node.selector.ranges()
        return HeadMode("streaming", r["block_size"], r["sink"], r["local"])
    size = node.selector.block_size
    return HeadMode("block", size) if isinstance(size, int) else None


def dense_below_applies(dense_below: dict, k) -> bool:
    return bool(dense_below) and k.shape[2] < dense_below.get(k.device.type, 0)
