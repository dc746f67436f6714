"""A LayerStack: one node per layer (explicit, model-relative or default), fitted to a model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import dump_config
from ..context import CallContext
from ..layer_spans import range_key, resolve_layer_key
from ..model_shape import ModelShape
from .compressed import Compressed
from .graphs import LayerGraphs, wanted
from .nodes import Branch, Node
from .oom import explain_out_of_memory, is_out_of_memory
from .phased import Phased
from .routed import Routed
from .runner import run


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
    # CUDA graphs of this stack's layer calls (used where the cuda_graphs setting is on)
    graphs: LayerGraphs = field(default_factory=LayerGraphs, init=False, repr=False, compare=False)

    def __call__(self, layer_idx: int, q, k, v, ctx: CallContext) -> torch.Tensor:
        """Attention of one layer: its node, run through ``run`` (left padding handled), replayed
        from a CUDA graph where ``attnzoo.stack.graphs`` can. Out of memory raises
        ``AttentionOutOfMemoryError`` naming the layer, node and shape."""
        node = self.node_for(layer_idx)
        failed = None
        try:
            if wanted(q, k, v, ctx):
                return self.graphs(run, layer_idx, node, q, k, v, ctx)
            return run(node, q, k, v, ctx)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            failed = str(e)
        # raised outside the except block: the failed call's frames (and the tensors they hold)
        # are not kept alive by this error's context
        raise explain_out_of_memory(failed, layer_idx, describe_node(node), q, k)

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
        out.graphs = self.graphs  # patch() resolves the stack on every entry: its graphs stay (keyed by node)
        out.check_num_layers(n)
        if isinstance(shape, ModelShape):
            for node in out.nodes():
                bind = getattr(getattr(node, "router", None), "bind", None) if isinstance(node, Routed) else None
                if bind is not None:
                    try:
                        bind(shape, {label: describe_node(b) for label, b in node.branches.items()})
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
    if isinstance(node, Phased):
        return f"{describe_node(node.prefill)}, decode: {describe_node(node.decode)}"
    return type(node).__name__
