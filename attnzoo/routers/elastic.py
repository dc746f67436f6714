"""Elastic Attention's learned head router (arXiv 2601.17367), inference side.

Per layer, from the layer's key states after k_proj (and k_norm) and *before* RoPE,
``[B, N, Hkv, D]``: pool each KV head over the first and last ``pool_tokens`` real prompt tokens,
apply the task MLP (D -> 4D -> D) and the router MLP (D -> 4D -> D -> 2) per head; class 1 is FA
(full attention). Inference is a hard argmax without noise, decided once at prefill per
(layer, KV head) and reused for every decode step (the stack caches it). Batch elements decide
independently. Training (Gumbel straight-through, Lagrangian sparsity) builds on ``logits``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..config import ConfigError, load_config, suggest
from ..model_shape import ModelShape
from ..ops.head_router import head_router, pool_keys  # noqa: F401  (pool_keys: re-exported)
from ..plans import HeadPlan
from ..registry import register
from ..settings import cache_root


class ElasticRouterLayer(nn.Module):
    """The two per-head MLPs of one layer (~0.26M parameters at D = 128)."""

    def __init__(self, head_dim: int):
        super().__init__()
        d = head_dim
        self.task = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.router = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.SiLU(), nn.Linear(d, 2))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, D]`` pooled keys -> ``[B, Hkv, 2]`` logits (index 1 = full attention)."""
        return self.router(self.task(pooled))

    def weights(self) -> tuple[torch.Tensor, ...]:
        """The ten tensors of ``ops.head_router`` (W1, b1, ..., W5, b5): the module's own parameters
        (``Module.to`` converts them in place, so the tuple is built once per layer)."""
        cached = self.__dict__.get("_weights")
        if cached is None:
            lin = [m for m in (*self.task, *self.router) if isinstance(m, nn.Linear)]
            cached = self.__dict__["_weights"] = tuple(t for m in lin for t in (m.weight, m.bias))
        return cached


WEIGHTS_DIR = Path(__file__).with_name("weights")


def shipped_weights() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))


def resolve_weights(name) -> Path:
    """A weights file path, or the name of one shipped with attnzoo (``smollm2-135m``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = WEIGHTS_DIR / f"{name}.pt"
    if shipped.is_file():
        return shipped
    raise ValueError(f"elastic router weights {str(name)!r}: no such file, and not a shipped name "
                     f"{shipped_weights()}{suggest(str(name), shipped_weights())}")


def trained_router_dir() -> Path:
    """Where ``attnzoo train elastic`` files the routers it trains, for ``weights: auto`` to find."""
    return cache_root() / "routers"


def known_routers() -> list[dict]:
    """Every router ``weights: auto`` can choose: ``{path, model (ModelShape), sparse}`` — the
    shipped ones (``weights/index.yaml``) and those trained on this machine (``trained_router_dir``)."""
    out = [{"path": WEIGHTS_DIR / f"{name}.pt", "model": ModelShape.from_config(meta["model"]),
            "sparse": meta["sparse"]} for name, meta in load_config(str(WEIGHTS_DIR / "index.yaml")).items()]
    for f in sorted(trained_router_dir().glob("*.pt")):
        meta = torch.load(f, map_location="cpu", weights_only=True).get("meta") or {}
        if "model" in meta and "sparse" in meta:
            out.append({"path": f, "model": ModelShape.from_config(meta["model"]), "sparse": meta["sparse"]})
    return out


def find_router(shape: ModelShape, sparse: str) -> Path:
    """The router trained for ``shape`` (geometry and name) with a ``sparse`` branch like this one
    (``"xattention->block_sparse"``); the most recently trained where several fit."""
    fits = [r for r in known_routers() if r["sparse"] == sparse and not r["model"].differences(shape)
            and (r["model"].name == shape.name or not shape.name)]
    if fits:
        return max(fits, key=lambda r: r["path"].stat().st_mtime)["path"]
    known = "; ".join(f"{r['path'].name}: {r['model'].describe()}, sparse {r['sparse']}" for r in known_routers())
    # the training default is the streaming branch; an XAttention branch is the xattention preset
    stack = {"streaming->block_sparse": "", "xattention->block_sparse": " --stack xattention"}.get(
        sparse, " --stack STACK.yaml (a stack whose layers run that sparse branch)")
    raise ValueError(f"elastic router weights: auto: no router trained for {shape.describe()} with a {sparse!r} "
                     f"sparse branch (known: {known}). Train one: attnzoo train elastic --model MODEL{stack} "
                     f"(it files the router under {trained_router_dir()})")


@register("router", "elastic")
@dataclass
class ElasticRouter:
    weights: str | None = None  # a file written by save(), a shipped name, or auto: the router trained for the model
    head_dim: int = 64
    full: str = "full"  # branch label FA heads run
    sparse: str = "sparse"  # branch label SA heads run
    forced: str | None = None  # route every head to this branch label (tests, ablations)
    pool_tokens: int = 100
    seed: int = 0  # initialisation of layers without weights (training starts here)
    needs_pre_rope_keys: ClassVar[bool] = True
    layers: nn.ModuleDict = field(init=False, repr=False, compare=False)
    _warned: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self):
        if self.head_dim < 1 or self.pool_tokens < 1:
            raise ValueError("head_dim and pool_tokens must be >= 1")
        self.layers = nn.ModuleDict()
        self._bound = None
        if self.weights is not None and self.weights != "auto":
            self.load(self.weights)

    def bind(self, shape: ModelShape, branches: dict[str, str]) -> None:
        """Meet a model: ``weights: auto`` loads the router trained for it (``find_router``, by the
        model's shape and name and the sparse branch's kind, ``branches[self.sparse]``); explicit
        weights must have the model's head dim."""
        if self.weights != "auto":
            if self.head_dim != shape.head_dim:
                raise ValueError(f"elastic router has head_dim={self.head_dim}; {shape.describe()} has head dim "
                                 f"{shape.head_dim}. Use weights: auto, or train one for this model: attnzoo "
                                 f"train elastic --model MODEL")
            return
        key = (shape, branches[self.sparse])
        if self._bound != key:
            self.head_dim = shape.head_dim
            self.layers = nn.ModuleDict()
            self.load(find_router(*key))
            self._bound = key

    def check_labels(self, labels: tuple[str, ...], path: str) -> None:
        for name in ("full", "sparse") + (("forced",) if self.forced is not None else ()):
            value = getattr(self, name)
            if value not in labels:
                raise ConfigError(f"{path}.{name}: branch {value!r}{suggest(value, labels)} is not among the "
                                  f"branches {list(labels)}")

    def layer(self, idx: int) -> ElasticRouterLayer:
        key = str(idx)
        if key not in self.layers:
            gen = torch.random.fork_rng(devices=[])
            with gen:
                torch.manual_seed(self.seed * 100003 + idx)
                self.layers[key] = ElasticRouterLayer(self.head_dim)
        return self.layers[key]

    def logits(self, pre_rope_keys: torch.Tensor, layer_idx: int, key_padding_mask=None) -> torch.Tensor:
        """``[B, Hkv, 2]`` router logits for one layer from ``[B, N, Hkv, D]`` pre-RoPE keys."""
        if pre_rope_keys.shape[-1] != self.head_dim:
            raise ValueError(f"elastic router has head_dim={self.head_dim}, keys have {pre_rope_keys.shape[-1]}")
        mod = self.layer(layer_idx)
        p = next(mod.parameters())
        if p.device != pre_rope_keys.device:  # moved once, not per call (Module.to walks every parameter)
            mod.to(pre_rope_keys.device)
        return head_router(pre_rope_keys, mod.weights(), pool_tokens=self.pool_tokens,
                           key_padding_mask=key_padding_mask)

    def __call__(self, q, k, ctx, labels) -> HeadPlan:
        B, Hkv = k.shape[0], k.shape[1]
        if self.forced is not None:
            return HeadPlan(torch.full((B, Hkv), labels.index(self.forced), device=k.device), labels)
        if self.weights == "auto" and self._bound is None:
            raise ValueError("elastic router weights: auto are chosen when the stack meets a model: run it through "
                             "attnzoo.patch(model, stack), or stack.for_model(model)")
        if ctx.pre_rope_keys is None:
            raise ValueError("the elastic router needs pre-RoPE keys: run the model through attnzoo.patch, "
                             "which hooks k_proj (and k_norm)")
        if self.weights is None and not self._warned:
            warnings.warn("elastic router has no trained weights (weights: null): its head decisions come from "
                          "randomly initialised MLPs; train one with attnzoo.training or load a weights file",
                          stacklevel=2)
            self._warned = True
        with torch.no_grad():
            z = self.logits(ctx.pre_rope_keys, ctx.layer_idx, ctx.key_padding_mask)
        fa = z[..., 1] > z[..., 0]
        branch = torch.where(fa, labels.index(self.full), labels.index(self.sparse))
        return HeadPlan(branch.to(k.device), labels)

    def save(self, path, dtype: torch.dtype | None = None, meta: dict | None = None) -> Path:
        """Write the weights (optionally cast, e.g. fp16 to ship half the bytes). ``meta``: what
        they were trained for (``{"model": ModelShape.to_config(), "sparse": "xattention->block_sparse"}``),
        which ``weights: auto`` reads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        torch.save({"format": "attnzoo.elastic_router/1", "head_dim": self.head_dim, "meta": meta or {},
                    "layers": {k: {n: cast(t.detach().cpu()) for n, t in m.state_dict().items()}
                               for k, m in self.layers.items()}}, path)
        return path

    def load(self, path) -> None:
        path = resolve_weights(path)
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "attnzoo.elastic_router/1":
            raise ValueError(f"{path}: not an attnzoo elastic router file")
        if data["head_dim"] != self.head_dim:
            raise ValueError(f"{path}: weights are for head_dim={data['head_dim']}, router has {self.head_dim}")
        for key, sd in data["layers"].items():
            mod = ElasticRouterLayer(self.head_dim)
            mod.load_state_dict(sd)
            self.layers[key] = mod
