"""Declarative attention stacks: a tree of nodes per layer, built from dicts or YAML.

Node grammar (recursive)::

    {op: dense}                                                  Branch, no selector
    {selector: {name: xattention, threshold: 0.9}, op: block_sparse}    Branch
    {router: {name: table, ...}, branches: {full: NODE, sparse: NODE}}  Routed
    {compress: {name: token_coverage}, inner: NODE}                     Compressed

A stack: ``{name, default: NODE, layers: {"0-1": NODE, "15-28": NODE}}``. ``build`` checks every
name, key, type and plan-kind pairing up front and reports the dotted path of the first problem.

Data flows one way: selector -> plan -> op. A Routed node asks its router for a HeadPlan
(one branch per batch element and KV head), then runs *one call per branch* on exactly the
(batch, KV head) pairs routed to it, folded into the batch dimension, and writes the outputs
back in head order — unless every branch can be written as a head mode (dense, streaming
ranges, block-sparse plan) and a single-launch ``mixed`` backend (Triton, on CUDA) takes the
call: then the branches' plans are assembled into one MixedPlan and run in one launch.
A Compressed node gathers each head's kept tokens, runs its inner node on the shorter tensors
and scatters the result back (dropped tokens get zeros).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

import torch

from .config import ConfigError, dump_config, load_config, suggest
from .ops import dense as dense_op
from .ops import mixed as mixed_op
from .ops import token_sparse
from .ops.executor import (HeadMode, HeadRun, branch_densities, common_block_size, fill_branch, mixed_plan,
                           pending_decision, split_by_branch, uniform_plan)
from .ops.mixed import fused_backend
from .ops.padding import StartAligned, first_real
from .plans import BlockPlan, DensePlan, HeadPlan, TokenPlan
from .registry import create, to_config
from .selectors.base import Context

__all__ = ["CallContext", "DensityMeter", "Branch", "Routed", "Compressed", "LayerStack", "build", "run"]


class DensityMeter:
    """Attention density actually used during prefill, per layer: each Branch adds
    ``share x density`` where share is the fraction of the layer's (batch, head) slots the call
    covers; dense work counts 1.0, compressed nodes multiply in their token plan's density.

    Densities are accumulated as device tensors where the plan lives on a GPU, so metering a
    prefill adds no host sync; reading ``layers`` or ``mean()`` afterwards waits for them once."""

    def __init__(self):
        self._sums: dict[int, float | torch.Tensor] = {}

    def add(self, layer, share, density) -> None:
        key = -1 if layer is None else layer
        self._sums[key] = self._sums.get(key, 0.0) + share * density

    @property
    def layers(self) -> dict[int, float]:
        return {k: float(v) for k, v in self._sums.items()}

    def mean(self) -> float:
        layers = self.layers
        return sum(layers.values()) / len(layers) if layers else float("nan")

    def reset(self) -> None:
        self._sums.clear()


@dataclass
class CallContext:
    """What one attention call knows besides q/k/v. ``cache`` is the per-layer state object
    (router decisions made at prefill and reused while decoding)."""

    key_padding_mask: torch.Tensor | None = None  # [B, Nk], True = real
    layer_idx: int | None = None
    scale: float | None = None
    pre_rope_keys: torch.Tensor | None = None  # [B, N, Hkv, D], for routers that need them
    cache: dict | None = None
    decode: bool = False  # one new query against a cache
    meter: DensityMeter | None = None
    share: float = 1.0  # fraction of the layer's (batch, head) slots this call covers
    density_scale: float = 1.0  # multiplier from enclosing compressed nodes

    def record(self, density: float) -> None:
        if self.meter is not None and not self.decode:
            self.meter.add(self.layer_idx, self.share, self.density_scale * density)

    def selector_context(self) -> Context:
        return Context(key_padding_mask=self.key_padding_mask, layer_idx=self.layer_idx)


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


@dataclass
class Branch(Node):
    op: object
    selector: object | None = None
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which attention runs dense

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if self.selector is None or _below(self.dense_below, k):
            ctx.record(1.0)
            if self.selector is not None:
                return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
            return self.op(q, k, v, None, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        if ctx.decode and getattr(self.selector, "decode", "dense") == "dense":
            # prefill-only methods attend densely over the whole cache while decoding
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        ranged = self._as_ranges(q, k, v, ctx)
        if ranged is not None:
            return ranged
        with torch.no_grad():  # plans are discrete; a plugin selector must not build a graph either
            plan = self.selector(q, k, ctx.selector_context())
        if ctx.meter is not None:
            ctx.record(density_of(plan))
        if isinstance(plan, DensePlan) and "dense" not in self.op.plan_kinds:
            return dense_op(q, k, v, causal=plan.causal, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        return self.op(q, k, v, plan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)

    def _as_ranges(self, q, k, v, ctx: CallContext):
        """A selector whose pattern is a range rule (streaming) runs as one mixed launch over
        ranges where a single-launch backend takes the call: no index lists, no selection."""
        mode = _head_mode(self)
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


@dataclass
class Routed(Node):
    router: object
    branches: dict[str, Node]
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which every head runs dense
    # per call shape: "mixed" (one launch) or "split" (a call per branch), chosen by timing both once
    _path: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.branches)

    def children(self):
        return list(self.branches.values())

    def decide(self, q, k, ctx: CallContext) -> HeadPlan:
        key = ("head_plan", id(self))
        if ctx.decode and ctx.cache is not None and key in ctx.cache:
            return ctx.cache[key]  # decided once at prefill, reused for every decode step
        with torch.no_grad():
            plan = self.router(q, k, ctx, self.labels)
        if not isinstance(plan, HeadPlan) or plan.labels != self.labels:
            raise ValueError(f"router {type(self.router).__name__} must return a HeadPlan over {self.labels}")
        plan.validate(q, k)
        if ctx.cache is not None:
            ctx.cache[key] = plan
        return plan

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if _below(self.dense_below, k):
            ctx.record(1.0)
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        plan = self.decide(q, k, ctx)
        path = self._choose_path(q, k, v, plan, ctx)
        if path != "split":
            out = self._paths()[path](q, k, v, plan, ctx)
            if out is not None:
                return out
        return self._split(q, k, v, plan, ctx)

    def _paths(self) -> dict:
        return {"mixed": self._fused, "hybrid": self._hybrid, "split": self._split}

    def _choose_path(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> str:
        """One mixed launch, the hybrid, or one call per branch: by measurement on the device, per
        call shape and layer.

        The mixed launch runs every head in the Triton kernel, with no host sync. The split runs
        dense heads through the fastest dense kernel (SDPA's cuDNN/FA3-class kernels on Hopper) and
        selects only for the heads routed to a sparse branch, at the cost of a host sync to find
        them, which leaves the GPU idle while the host launches the rest. The hybrid queues the
        sparse branches' single launch before that sync, so the GPU has work while it waits. Which
        wins depends on the share of dense heads (a router sends most heads of some layers to full
        attention) and the length, so the first call of each shape in each layer times each path
        (CUDA events, best of two after a warm-up, behind queued GPU work as in a prefill) and keeps
        the fastest for that layer. On the CPU there is no single-launch backend: split."""
        if q.device.type != "cuda" or ctx.decode:
            return "mixed"  # _fused declines where it cannot run; the CPU falls through to split
        key = (ctx.layer_idx, tuple(q.shape), tuple(k.shape), q.dtype, ctx.key_padding_mask is None)
        if key not in self._path:
            quiet = replace(ctx, meter=None)
            timings = {}
            for name, fn in self._paths().items():
                if fn(q, k, v, plan, quiet) is None:  # also the warm-up: kernels compile now
                    continue
                timings[name] = min(_time_behind_busy_gpu(lambda: fn(q, k, v, plan, quiet)) for _ in range(2))  # noqa: B023
            best = min(timings, key=timings.get)
            if best != "mixed" and timings[best] > SYNC_PATH_MARGIN * timings.get("mixed", float("inf")):
                best = "mixed"
            self._path[key] = best
        return self._path[key]

    def _split(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> torch.Tensor:
        return split_by_branch(q, k, plan.branch, len(self.labels), self._run_branch(q, k, v, ctx))

    def _run_branch(self, q, k, v, ctx: CallContext):
        """``run(i, part)`` for ``ops.executor``: branch ``i`` on every pair (None), on a run of
        heads (views) or on gathered pairs folded into the batch."""
        def run(i, part):
            node = self.branches[self.labels[i]]
            if part is None:  # every pair takes this branch
                return node(q, k, v, ctx)
            if isinstance(part, HeadRun):
                return node(*self._slice(q, k, v, ctx, part))
            return node(*self._fold(q, k, v, ctx, *part))

        return run

    @staticmethod
    def _slice(q, k, v, ctx, r: HeadRun):
        """KV heads ``r.h0:r.h1`` of batch element ``r.b`` (and their query heads), as views."""
        B, Hq = q.shape[:2]
        Hkv = k.shape[1]
        g, b = Hq // Hkv, slice(r.b, r.b + 1)
        sub = replace(
            ctx,
            key_padding_mask=None if ctx.key_padding_mask is None else ctx.key_padding_mask[b],
            pre_rope_keys=None if ctx.pre_rope_keys is None else ctx.pre_rope_keys[b, :, r.h0:r.h1],
            cache=None,  # nested routers decide per call
            share=ctx.share * (r.h1 - r.h0) / (B * Hkv),
        )
        return q[b, r.h0 * g:r.h1 * g], k[b, r.h0:r.h1], v[b, r.h0:r.h1], sub

    @staticmethod
    def _fold(q, k, v, ctx, b, h):
        """The (batch, KV head) pairs ``(b[i], h[i])`` as a batch of single-KV-head problems."""
        B, Hq, Nq, D = q.shape
        Hkv = k.shape[1]
        sub = replace(
            ctx,
            key_padding_mask=None if ctx.key_padding_mask is None else ctx.key_padding_mask[b],
            pre_rope_keys=None if ctx.pre_rope_keys is None else ctx.pre_rope_keys[b, :, h, None],
            cache=None,  # nested routers decide per call inside a sub-batch
            share=ctx.share * len(b) / (B * Hkv),
        )
        qs = q.reshape(B, Hkv, Hq // Hkv, Nq, D)[b, h]  # [n, g, Nq, D]: the pairs become the batch
        return qs, k[b, h][:, None], v[b, h][:, None], sub

    def head_modes(self) -> list[HeadMode] | None:
        """Every branch as a mixed-plan head mode, or None if one cannot be written as one."""
        modes = [_head_mode(self.branches[label]) for label in self.labels]
        return None if any(m is None for m in modes) else modes

    def _fused(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> torch.Tensor | None:
        """All branches in one mixed-mode launch (no host sync), or None where that is not possible."""
        parts = self._mixed_parts(q, k, v, plan, ctx)
        if parts is None:
            return None
        mplan, backend = parts
        self._record_mixed(plan, mplan, ctx)
        return mixed_op(q, k, v, mplan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale, backend=backend)

    def _hybrid(self, q, k, v, plan: HeadPlan, ctx: CallContext) -> torch.Tensor | None:
        """The sparse branches in one mixed launch, queued before the host waits for the router's
        decision; then the dense branch's heads through the fastest dense kernel (see
        ``ops.executor``). None where there is not exactly one dense branch or no mixed launch."""
        modes = self.head_modes()
        dense = [i for i, m in enumerate(modes or ()) if m.kind == "dense"]
        if ctx.decode or len(dense) != 1:
            return None
        decision = pending_decision(plan.branch)  # its copy is queued before the selectors' work
        parts = self._mixed_parts(q, k, v, plan, ctx, skip=dense[0])
        if parts is None:
            return None
        mplan, backend = parts
        self._record_mixed(plan, mplan, ctx, skip=dense[0])
        out = mixed_op(q, k, v, mplan, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale, backend=backend)
        return fill_branch(out, plan.branch, decision(), dense[0], self._run_branch(q, k, v, ctx))

    def _mixed_parts(self, q, k, v, plan: HeadPlan, ctx: CallContext, skip: int | None = None):
        """(MixedPlan, backend name) of a single launch of every branch but ``skip``, or None."""
        if ctx.decode:
            return None
        modes = self.head_modes()
        if modes is None:
            return None
        bs = common_block_size(modes)
        if bs is None:
            return None  # one launch needs one block size across branches
        backend = fused_backend(q, k, v, q.shape[1], bs, key_padding_mask=ctx.key_padding_mask)
        if backend is None:
            return None
        block_plans = {}
        for i, m in enumerate(modes):
            if m.kind == "block":  # every head's rows, but a selector may skip those routed elsewhere
                with torch.no_grad():
                    sctx = replace(ctx.selector_context(), active_heads=plan.branch == i)
                    bp = self.branches[self.labels[i]].selector(q, k, sctx)
                if not isinstance(bp, BlockPlan):
                    return None  # e.g. a selector that fell back to a dense plan on a short input
                block_plans[i] = bp
        mplan = mixed_plan(plan.branch, modes, block_plans, q.shape[1], q.shape[2], k.shape[2], bs, skip=skip)
        return mplan, backend.name

    def _record_mixed(self, plan: HeadPlan, mplan, ctx: CallContext, skip: int | None = None) -> None:
        if ctx.meter is None:
            return
        for i, (share, density) in enumerate(branch_densities(plan.branch, mplan, len(self.labels))):
            if i != skip:  # the skipped branch's own call records it
                replace(ctx, share=ctx.share * share).record(density)

    def to_config(self) -> dict:
        out = {"router": to_config(self.router), "branches": {k: n.to_config() for k, n in self.branches.items()}}
        if self.dense_below:
            out["dense_below"] = dict(self.dense_below)
        return out


# A path with a host sync must beat the sync-free mixed launch by this factor: after the sync the host
# no longer runs ahead of the GPU, a cost one call's timing does not show. On the embedded model at
# 32K (H100), keeping every layer whose split measured faster made Elastic FA-XA's prefill slower
# (1.08x full, against 1.15x with every layer mixed; bench/results/gpu-h100-e2e).
SYNC_PATH_MARGIN = 0.9


def _time_behind_busy_gpu(fn, busy_cycles: int = 4_000_000) -> float:
    """Milliseconds of GPU time from the start of ``fn``'s work to its end, with the GPU kept busy
    (~2 ms of spinning) while the host queues it. In a prefill the host runs ahead of the GPU, so
    a host sync inside ``fn`` stalls the GPU for as long as the host then needs to launch the next
    kernel; timed from an idle GPU, that stall would not show, and a path that queues its work
    before it syncs would not show its advantage either."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(busy_cycles)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@functools.lru_cache(maxsize=64)
def _uniform_density(mode: HeadMode, q_len: int, kv_len: int) -> float:
    """Density of a range rule: it depends on shapes only, so it is computed once on the CPU."""
    return uniform_plan(mode, 1, 1, q_len, kv_len, torch.device("cpu")).density()


def _head_mode(node) -> HeadMode | None:
    """``node`` as a mixed-plan head mode, or None if it cannot run as one."""
    if not isinstance(node, Branch) or getattr(node.op, "backend", None) is not None:
        return None  # other node types, or a branch whose user forced an op backend
    kinds = getattr(node.op, "plan_kinds", ())
    if node.selector is None:
        return HeadMode("dense") if "dense" in kinds else None
    if "block" not in kinds or getattr(node.selector, "plan_kind", None) != "block":
        return None
    if hasattr(node.selector, "ranges"):
        r = node.selector.ranges()
        return HeadMode("streaming", r["block_size"], r["sink"], r["local"])
    size = getattr(node.selector, "block_size", None)
    return HeadMode("block", size) if isinstance(size, int) else None


@dataclass
class Compressed(Node):
    compress: object
    inner: Node
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which attention runs dense

    def children(self):
        return [self.inner]

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if _below(self.dense_below, k):
            ctx.record(1.0)
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        if ctx.decode:
            return self.inner(q, k, v, ctx)  # the cache holds uncompressed K/V
        with torch.no_grad():
            plan = self.compress(q, k, ctx.selector_context())
        if isinstance(plan, DensePlan):
            return self.inner(q, k, v, ctx)
        if not isinstance(plan, TokenPlan):
            raise TypeError(f"compress selector returned {type(plan).__name__}, expected a TokenPlan")
        qc, kc, vc = token_sparse.compress(q, k, v, plan, key_padding_mask=ctx.key_padding_mask)
        # kept tokens are real tokens; shorter heads' tail slots sit after every real row (causal)
        inner = replace(ctx, key_padding_mask=None, pre_rope_keys=None,
                        density_scale=ctx.density_scale * density_of(plan))
        oc = self.inner(qc, kc, vc, inner)
        return token_sparse.decompress(oc, plan, q.shape[2])

    def to_config(self) -> dict:
        out = {"compress": to_config(self.compress), "inner": self.inner.to_config()}
        if self.dense_below:
            out["dense_below"] = dict(self.dense_below)
        return out


@dataclass
class LayerStack:
    name: str
    default: Node
    layers: dict[tuple[int, int], Node] = field(default_factory=dict)
    description: str = ""

    def __call__(self, layer_idx: int, q, k, v, ctx: CallContext) -> torch.Tensor:
        """Attention of one layer: its node, run through ``run`` (left padding handled)."""
        return run(self.node_for(layer_idx), q, k, v, ctx)

    def node_for(self, layer_idx: int) -> Node:
        for (lo, hi), node in self.layers.items():
            if lo <= layer_idx <= hi:
                return node
        return self.default

    def check_num_layers(self, num_layers: int) -> None:
        for lo, hi in self.layers:
            if hi >= num_layers:
                raise ValueError(f"stack {self.name!r}: layer range {_range_key(lo, hi)} is outside the "
                                 f"model's {num_layers} layers (0-{num_layers - 1})")
        for node in self.nodes():
            check = getattr(getattr(node, "router", None), "check_num_layers", None)
            if check is not None:
                try:
                    check(num_layers)
                except ValueError as e:
                    raise ValueError(f"stack {self.name!r}: {e}") from None

    def nodes(self):
        for node in [self.default, *self.layers.values()]:
            yield from node.walk()

    def to_config(self) -> dict:
        out = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["default"] = self.default.to_config()
        if self.layers:
            out["layers"] = {_range_key(lo, hi): n.to_config() for (lo, hi), n in self.layers.items()}
        return out

    def to_yaml(self) -> str:
        return dump_config(self.to_config())

    def __repr__(self) -> str:
        parts = [f"default={_describe(self.default)}"]
        parts += [f"{_range_key(lo, hi)}={_describe(n)}" for (lo, hi), n in self.layers.items()]
        return f"LayerStack({self.name!r}: {', '.join(parts)})"


def _describe(node: Node) -> str:
    if isinstance(node, Branch):
        sel = f"{node.selector.registry_name}->" if node.selector is not None else ""
        return sel + node.op.registry_name
    if isinstance(node, Routed):
        inner = ", ".join(f"{k}: {_describe(n)}" for k, n in node.branches.items())
        return f"{node.router.registry_name}{{{inner}}}"
    if isinstance(node, Compressed):
        return f"{node.compress.registry_name}[{_describe(node.inner)}]"
    return type(node).__name__


def _range_key(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


# -- running a layer -----------------------------------------------------------------------------

def _places_blocks(node: Node, decode: bool) -> bool:
    """Whether ``node`` lays anything out by position (a plan grid, a sink, token choices) in a
    call of this kind: while decoding only selectors that keep a plan over the cache do."""
    for n in node.walk():
        if isinstance(n, Branch) and n.selector is not None:
            if not decode or getattr(n.selector, "decode", "dense") == "plan":
                return True
        elif not decode and isinstance(n, (Routed, Compressed)):
            return True
    return False


def run(node: Node, q, k, v, ctx: CallContext) -> torch.Tensor:
    """Run one layer's ``node``, with left padding made invisible to its selectors.

    Plans place blocks, strides and sinks from each sequence's first token. A left-padded sequence
    would put them on its padding, so the layer would compute something other than the prompt
    alone. Prefill (Nq == Nk) rolls every sequence to start at row 0 on the device (see
    ``ops.padding``); a call with Nq < Nk that places blocks (chunked prefill, or a decode step of
    a selector that keeps a plan, like ``streaming``) runs one sequence at a time on its real
    suffix, which costs one host sync. Nodes that place nothing run unchanged.
    """
    kpm = ctx.key_padding_mask
    if kpm is None or not _places_blocks(node, ctx.decode):
        return node(q, k, v, ctx)
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    keys = ctx.pre_rope_keys
    if Nq == Nk:
        al = StartAligned(kpm)
        sub = replace(ctx, key_padding_mask=al.mask, pre_rope_keys=None if keys is None else al.align(keys, 1))
        return al.restore(node(al.align(q), al.align(k), al.align(v), sub))
    outs = []
    for b, start in enumerate(first_real(kpm).tolist()):
        s = min(start, Nk - Nq)  # query rows are never cut
        cache = None if ctx.cache is None else {key: val.select(b) if isinstance(val, HeadPlan) else val
                                                for key, val in ctx.cache.items()}
        sub = replace(ctx, key_padding_mask=kpm[b:b + 1, s:], cache=cache, share=ctx.share / B,
                      pre_rope_keys=None if keys is None else keys[b:b + 1, s:])
        outs.append(node(q[b:b + 1], k[b:b + 1, :, s:], v[b:b + 1, :, s:], sub))
    return torch.cat(outs)


# -- building ------------------------------------------------------------------------------------

NODE_SHAPES = {
    frozenset({"op"}): "branch",
    frozenset({"op", "selector"}): "branch",
    frozenset({"op", "selector", "dense_below"}): "branch",
    frozenset({"router", "branches"}): "routed",
    frozenset({"router", "branches", "dense_below"}): "routed",
    frozenset({"compress", "inner"}): "compressed",
    frozenset({"compress", "inner", "dense_below"}): "compressed",
}
NODE_KEYS = ("op", "selector", "router", "branches", "compress", "inner", "dense_below")
SHAPES_HELP = "{op}, {selector, op[, dense_below]}, {router, branches[, dense_below]}, {compress, inner[, dense_below]}"


def build_node(spec, path: str) -> Node:
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a node must be a mapping like {SHAPES_HELP}, got {spec!r}")
    for key in spec:
        if key not in NODE_KEYS:
            raise ConfigError(f"{path}.{key}: unknown node key{suggest(key, NODE_KEYS)}. Node shapes: {SHAPES_HELP}")
    kind = NODE_SHAPES.get(frozenset(spec))
    if kind is None:
        raise ConfigError(f"{path}: keys {sorted(spec)} do not form a node. Node shapes: {SHAPES_HELP}")
    if kind == "branch":
        op = create("op", spec["op"], f"{path}.op")
        selector = create("selector", spec["selector"], f"{path}.selector") if "selector" in spec else None
        kind_out = "dense" if selector is None else getattr(selector, "plan_kind", None)
        if kind_out is not None and kind_out not in op.plan_kinds:
            who = "a branch without a selector" if selector is None else f"selector {selector.registry_name!r}"
            raise ConfigError(f"{path}.op: op {op.registry_name!r} cannot run {kind_out!r} plans from {who} "
                              f"(it takes {list(op.plan_kinds)})")
        return Branch(op=op, selector=selector, dense_below=_dense_below(spec, path))
    if kind == "routed":
        branches = spec["branches"]
        if not isinstance(branches, dict) or not branches:
            raise ConfigError(f"{path}.branches: expected a non-empty mapping label -> node")
        nodes = {}
        for label, sub in branches.items():
            if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", label):
                raise ConfigError(f"{path}.branches: branch label {label!r} must be a name")
            nodes[label] = build_node(sub, f"{path}.branches.{label}")
        router = create("router", spec["router"], f"{path}.router")
        router.check_labels(tuple(nodes), f"{path}.router")
        return Routed(router=router, branches=nodes, dense_below=_dense_below(spec, path))
    compress = create("selector", spec["compress"], f"{path}.compress")
    if getattr(compress, "plan_kind", None) != "token":
        raise ConfigError(f"{path}.compress: selector {compress.registry_name!r} does not choose tokens "
                          f"(needs a token selector such as 'token_coverage')")
    inner = build_node(spec["inner"], f"{path}.inner")
    if any(isinstance(n, Routed) for n in inner.walk()):
        raise ConfigError(f"{path}.inner: routers inside a compressed node are not supported (they need "
                          f"pre-RoPE keys of the full sequence)")
    return Compressed(compress=compress, inner=inner, dense_below=_dense_below(spec, path))


DEVICE_TYPES = ("cpu", "cuda")


def _dense_below(spec: dict, path: str) -> dict:
    """``dense_below``: keys below which the node runs dense attention, per device type (a sparse
    method's crossover is a property of the hardware), e.g. ``{cuda: 32768}``; an int applies to all."""
    value = spec.get("dense_below", {})
    if isinstance(value, int) and not isinstance(value, bool):
        value = {d: value for d in DEVICE_TYPES}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}.dense_below: expected a number of keys or a mapping device -> keys, got {value!r}")
    for dev, n in value.items():
        if dev not in DEVICE_TYPES:
            raise ConfigError(f"{path}.dense_below.{dev}: unknown device type{suggest(str(dev), DEVICE_TYPES)}; "
                              f"expected one of {list(DEVICE_TYPES)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"{path}.dense_below.{dev}: expected a number of keys >= 0, got {n!r}")
    return {d: n for d, n in value.items() if n}


def _below(dense_below: dict, k) -> bool:
    return bool(dense_below) and k.shape[2] < dense_below.get(k.device.type, 0)


def _parse_range(key, path: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(key))
    if not m:
        raise ConfigError(f"{path}: layer range {key!r} must look like '3' or '0-11'")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise ConfigError(f"{path}: layer range {key!r} is empty (end before start)")
    return lo, hi


STACK_KEYS = ("name", "description", "default", "layers")


def build(src) -> LayerStack:
    """A LayerStack from a dict, a YAML/JSON path, YAML text, ``"preset:NAME"``, or a LayerStack."""
    if isinstance(src, LayerStack):
        return src
    cfg = load_config(src)
    for key in cfg:
        if key not in STACK_KEYS:
            raise ConfigError(f"{key}: unknown stack key{suggest(key, STACK_KEYS)}. Valid keys: {list(STACK_KEYS)}")
    if "default" not in cfg:
        raise ConfigError("default: missing; a stack needs a default node, e.g. {op: dense}")
    name = cfg.get("name", "stack")
    if not isinstance(name, str):
        raise ConfigError(f"name: expected a string, got {name!r}")
    default = build_node(cfg["default"], "default")
    layers = {}
    raw = cfg.get("layers") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"layers: expected a mapping of layer ranges to nodes, got {raw!r}")
    for key, spec in raw.items():
        rng = _parse_range(key, f"layers.{key}")
        for other in layers:
            if rng[0] <= other[1] and other[0] <= rng[1]:
                raise ConfigError(f"layers.{key}: overlaps layer range {_range_key(*other)}")
        layers[rng] = build_node(spec, f"layers.{key}")
    return LayerStack(name=name, default=default, layers=layers, description=str(cfg.get("description", "")))
