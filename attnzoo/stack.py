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

import re
from dataclasses import dataclass, field, replace

import torch

from .config import ConfigError, dump_config, load_config, suggest
from .context import deferred_value
from .layer_spans import parse_layer_key, range_key, resolve_layer_key
from .model_shape import ModelShape
from .nodes import Branch, CallContext, DensityMeter, Node, dense_below_applies, density_of  # noqa: F401
from .ops import dense as dense_op
from .ops import token_sparse
from .ops.padding import StartAligned, first_real
from .plans import DensePlan, HeadPlan, TokenPlan
from .registry import create, to_config
from .routed import Routed

__all__ = ["CallContext", "DensityMeter", "Branch", "Routed", "Compressed", "LayerStack", "build", "run"]


@dataclass
class Compressed(Node):
    compress: object
    inner: Node
    dense_below: dict = field(default_factory=dict)  # device type -> keys below which attention runs dense

    def children(self):
        return [self.inner]

    def __call__(self, q, k, v, ctx: CallContext) -> torch.Tensor:
        if dense_below_applies(self.dense_below, k):
            ctx.record(1.0)
            return dense_op(q, k, v, key_padding_mask=ctx.key_padding_mask, scale=ctx.scale)
        if ctx.decode:
            return self.inner(q, k, v, ctx)  # the cache holds uncompressed K/V
        B = q.shape[0]
        if B > 1 and _places_blocks(self.inner, False):
            # a batch pads every head's kept tokens to the batch's longest (tail slots hold copies of
            # token 0), so an inner selector placing blocks would score a sequence differently beside
            # other prompts than alone: one sequence at a time keeps batched == alone
            kpm, keys = ctx.key_padding_mask, ctx.pre_rope_keys
            return torch.cat([self(q[b:b + 1], k[b:b + 1], v[b:b + 1], replace(
                ctx, key_padding_mask=None if kpm is None else kpm[b:b + 1], share=ctx.share / B,
                pre_rope_keys=None if keys is None else keys[b:b + 1])) for b in range(B)])
        with torch.no_grad():
            plan = self.compress(q, k, ctx)
        if isinstance(plan, DensePlan):
            return self.inner(q, k, v, ctx)
        if not isinstance(plan, TokenPlan):
            raise TypeError(f"compress selector returned {type(plan).__name__}, expected a TokenPlan")
        qc, kc, vc = token_sparse.compress(q, k, v, plan, key_padding_mask=ctx.key_padding_mask)
        # kept tokens are real tokens; shorter heads' tail slots sit after every real row (causal)
        outer = ctx.density_scale
        inner = replace(ctx, key_padding_mask=None, pre_rope_keys=None,  # the scale is read lazily
                        density_scale=lambda: deferred_value(outer) * density_of(plan))
        oc = self.inner(qc, kc, vc, inner)
        return token_sparse.decompress(oc, plan, q.shape[2])

    def to_config(self) -> dict:
        out = {"compress": to_config(self.compress), "inner": self.inner.to_config()}
        if self.dense_below:
            out["dense_below"] = dict(self.dense_below)
        return out


@dataclass
class LayerStack:
    """One node per layer: ``layers`` by explicit range, ``relative`` by keys that resolve against
    a model's depth (``first:2``, ``from:0.5``; see ``attnzoo.layer_spans``), ``default`` for the
    rest. ``fitted_for``: the model its model-specific parts were made for (``shape``, the
    ``parts`` it names, the ``refit`` command); ``for_model`` checks it."""

    name: str
    default: Node
    layers: dict[tuple[int, int], Node] = field(default_factory=dict)
    description: str = ""
    relative: dict[str, Node] = field(default_factory=dict)
    fitted_for: dict | None = None

    def __call__(self, layer_idx: int, q, k, v, ctx: CallContext) -> torch.Tensor:
        """Attention of one layer: its node, run through ``run`` (left padding handled)."""
        return run(self.node_for(layer_idx), q, k, v, ctx)

    def node_for(self, layer_idx: int) -> Node:
        if self.relative:
            raise ValueError(f"stack {self.name!r} has layer keys relative to the model's depth "
                             f"({', '.join(self.relative)}): take stack.for_model(model) first (attnzoo.patch does)")
        for (lo, hi), node in self.layers.items():
            if lo <= layer_idx <= hi:
                return node
        return self.default

    def for_model(self, model) -> LayerStack:
        """This stack on ``model`` (a transformers model, a ``ModelShape`` or a number of layers):
        relative layer keys resolved, every layer key and router table checked against the depth,
        ``fitted_for`` checked against the geometry, and routers that pick their weights per model
        (``weights: auto``) bound. Raises ValueError naming what does not fit and how to fit it."""
        shape = model if isinstance(model, (ModelShape, int)) else ModelShape.of(model)
        n = shape if isinstance(shape, int) else shape.layers
        if isinstance(shape, ModelShape):
            self._check_fit(shape)
        layers = dict(self.layers)
        for key, node in self.relative.items():
            lo, hi = resolve_layer_key(key, n, f"stack {self.name!r}")
            for (a, b) in layers:
                if lo <= b and a <= hi:
                    raise ValueError(f"stack {self.name!r}: layer key {key!r} ({range_key(lo, hi)} of {n} layers) "
                                     f"overlaps layer range {range_key(a, b)}")
            layers[(lo, hi)] = node
        out = replace(self, layers=dict(sorted(layers.items())), relative={})
        out.check_num_layers(n)
        if isinstance(shape, ModelShape):
            for node in out.nodes():
                bind = getattr(getattr(node, "router", None), "bind", None) if isinstance(node, Routed) else None
                if bind is not None:
                    try:
                        bind(shape, {label: describe_node(n) for label, n in node.branches.items()})
                    except ValueError as e:
                        raise ValueError(f"stack {self.name!r}: {e}") from None
        return out

    def _check_fit(self, shape: ModelShape) -> None:
        if not self.fitted_for:
            return
        fitted = ModelShape.from_config(self.fitted_for)
        diff = fitted.differences(shape)
        if diff:
            parts = self.fitted_for.get("parts", "model-specific parts")
            refit = self.fitted_for.get("refit")
            how = (f" Make one for this model: {refit}" if refit
                   else " Write that part for this model (no command makes it).")
            raise ValueError(f"stack {self.name!r} is fitted to {fitted.describe()}; its model-specific part "
                             f"({parts}) does not fit {shape.describe()}: {'; '.join(diff)}.{how}")

    def check_num_layers(self, num_layers: int) -> None:
        for lo, hi in self.layers:
            if hi >= num_layers:
                raise ValueError(f"stack {self.name!r}: layer range {range_key(lo, hi)} is outside the "
                                 f"model's {num_layers} layers (0-{num_layers - 1})")
        for key in self.relative:
            resolve_layer_key(key, num_layers, f"stack {self.name!r}")
        for node in self.nodes():
            check = node.router.check_num_layers if isinstance(node, Routed) else None
            if check is not None:
                try:
                    check(num_layers)
                except ValueError as e:
                    raise ValueError(f"stack {self.name!r}: {e}") from None

    def nodes(self):
        for node in [self.default, *self.layers.values(), *self.relative.values()]:
            yield from node.walk()

    def to_config(self) -> dict:
        out = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.fitted_for:
            out["fitted_for"] = dict(self.fitted_for)
        out["default"] = self.default.to_config()
        if self.layers or self.relative:
            out["layers"] = {**{key: n.to_config() for key, n in self.relative.items()},
                             **{range_key(lo, hi): n.to_config() for (lo, hi), n in self.layers.items()}}
        return out

    def to_yaml(self) -> str:
        return dump_config(self.to_config())

    def __repr__(self) -> str:
        parts = [f"default={describe_node(self.default)}"]
        parts += [f"{key}={describe_node(n)}" for key, n in self.relative.items()]
        parts += [f"{range_key(lo, hi)}={describe_node(n)}" for (lo, hi), n in self.layers.items()]
        return f"LayerStack({self.name!r}: {', '.join(parts)})"


def describe_node(node: Node) -> str:
    """``xattention->block_sparse``, ``elastic{full: dense, sparse: streaming->block_sparse}``."""
    if isinstance(node, Branch):
        sel = f"{node.selector.registry_name}->" if node.selector is not None else ""
        return sel + node.op.registry_name
    if isinstance(node, Routed):
        inner = ", ".join(f"{k}: {describe_node(n)}" for k, n in node.branches.items())
        return f"{node.router.registry_name}{{{inner}}}"
    if isinstance(node, Compressed):
        return f"{node.compress.registry_name}[{describe_node(node.inner)}]"
    return type(node).__name__


# -- running a layer -----------------------------------------------------------------------------

def _places_blocks(node: Node, decode: bool) -> bool:
    """Whether ``node`` lays anything out by position (a plan grid, a sink, token choices) in a
    call of this kind: while decoding only selectors that keep a plan over the cache do."""
    for n in node.walk():
        if isinstance(n, Branch) and n.selector is not None:
            if not decode or n.selector.decode == "plan":
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
        kind_out = "dense" if selector is None else selector.plan_kind  # declared (attnzoo.contracts)
        if kind_out not in op.plan_kinds:
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
    if compress.plan_kind != "token":
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


STACK_KEYS = ("name", "description", "fitted_for", "default", "layers")


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
    layers, relative = {}, {}
    raw = cfg.get("layers") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"layers: expected a mapping of layer ranges to nodes, got {raw!r}")
    for key, spec in raw.items():
        rng = parse_layer_key(key, f"layers.{key}")
        if isinstance(rng, str):
            relative[rng] = build_node(spec, f"layers.{key}")
            continue
        for other in layers:
            if rng[0] <= other[1] and other[0] <= rng[1]:
                raise ConfigError(f"layers.{key}: overlaps layer range {range_key(*other)}")
        layers[rng] = build_node(spec, f"layers.{key}")
    fitted = cfg.get("fitted_for")
    if fitted is not None:
        if not isinstance(fitted, dict):
            raise ConfigError(f"fitted_for: expected a mapping (name, layers, heads, kv_heads, head_dim, parts, "
                              f"refit), got {fitted!r}")
        extra = set(fitted) - {"name", "layers", "heads", "kv_heads", "head_dim", "parts", "refit"}
        if extra:
            raise ConfigError(f"fitted_for: unknown key(s) {sorted(extra)}; expected name, layers, heads, kv_heads, "
                              f"head_dim, parts, refit")
        try:
            ModelShape.from_config(fitted)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return LayerStack(name=name, default=default, layers=layers, description=str(cfg.get("description", "")),
                      relative=relative, fitted_for=fitted)
