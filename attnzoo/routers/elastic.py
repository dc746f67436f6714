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

from ..config import ConfigError, suggest
from ..ops.head_router import head_router, pool_keys  # noqa: F401  (pool_keys: re-exported)
from ..plans import HeadPlan
from ..registry import register


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


@register("router", "elastic")
@dataclass
class ElasticRouter:
    weights: str | None = None  # a file written by save() or a shipped name; torch.load(weights_only=True)
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
        if self.weights is not None:
            self.load(self.weights)

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

    def save(self, path, dtype: torch.dtype | None = None) -> Path:
        """Write the weights (optionally cast, e.g. fp16 to ship half the bytes)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        torch.save({"format": "attnzoo.elastic_router/1", "head_dim": self.head_dim,
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
