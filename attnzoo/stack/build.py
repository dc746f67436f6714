"""``build``: a LayerStack from a dict, YAML or a preset name, every name, key and pairing checked."""

from __future__ import annotations

import re

from ..config import ConfigError, load_config, suggest
from ..layer_spans import parse_layer_key, range_key
from ..model_shape import ModelShape
from ..registry import create
from .compressed import Compressed
from .layers import LayerStack
from .nodes import Branch, Node
from .phased import Phased
from .routed import Routed

NODE_SHAPES = {
    frozenset({"op"}): "branch",
    frozenset({"op", "selector"}): "branch",
    frozenset({"op", "selector", "dense_below"}): "branch",
    frozenset({"router", "branches"}): "routed",
    frozenset({"router", "branches", "dense_below"}): "routed",
    frozenset({"compress", "inner"}): "compressed",
    frozenset({"compress", "inner", "dense_below"}): "compressed",
}
NODE_KEYS = ("op", "selector", "router", "branches", "compress", "inner", "dense_below", "decode")
SHAPES_HELP = ("{op}, {selector, op[, dense_below]}, {router, branches[, dense_below]}, "
               "{compress, inner[, dense_below]}; any of them with a decode part: [decode: NODE]")


def build_node(spec, path: str) -> Node:
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a node must be a mapping like {SHAPES_HELP}, got {spec!r}")
    for key in spec:
        if key not in NODE_KEYS:
            raise ConfigError(f"{path}.{key}: unknown node key{suggest(key, NODE_KEYS)}. Node shapes: {SHAPES_HELP}")
    if "decode" in spec:
        if isinstance(spec["decode"], dict) and "decode" in spec["decode"]:
            raise ConfigError(f"{path}.decode.decode: a decode part has no decode part of its own")
        prefill = build_node({k: v for k, v in spec.items() if k != "decode"}, path)
        return Phased(prefill=prefill, decode=build_node(spec["decode"], f"{path}.decode"))
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
