"""A static per-layer, per-KV-head branch table (DuoAttention / MInference style)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import ConfigError, load_config, suggest
from ..plans import HeadPlan
from ..registry import register


@register("router", "table")
@dataclass
class TableRouter:
    """``heads: {layer: [label per KV head]}``; layers not listed use ``default``. ``path`` names a
    YAML file with the same two keys (merged under the inline ones)."""

    heads: dict[int, list[str]] = field(default_factory=dict)
    default: str | None = None
    path: str | None = None
    needs_pre_rope_keys: ClassVar[bool] = False

    def __post_init__(self):
        if self.path is not None:
            data = load_config(self.path)
            for key in data:
                if key not in ("heads", "default"):
                    raise ConfigError(f"{self.path}: unknown key {key!r}; a table file has 'heads' and 'default'")
            self.heads = {**{int(k): list(v) for k, v in (data.get("heads") or {}).items()}, **self.heads}
            self.default = self.default if self.default is not None else data.get("default")
        for layer, row in self.heads.items():
            if layer < 0 or not row:
                raise ValueError(f"heads.{layer}: expected a non-empty list of branch labels for a layer >= 0")

    def check_num_layers(self, num_layers: int) -> None:
        """A row for a layer the model does not have is a mistake (a wrong model or a typo)."""
        extra = sorted(layer for layer in self.heads if layer >= num_layers)
        if extra:
            raise ValueError(f"table router: heads lists layer(s) {extra}, but the model has {num_layers} layers "
                             f"(0-{num_layers - 1})")

    def check_labels(self, labels: tuple[str, ...], path: str) -> None:
        used = {x for row in self.heads.values() for x in row} | ({self.default} if self.default else set())
        for label in sorted(used):
            if label not in labels:
                raise ConfigError(f"{path}: table names branch {label!r}{suggest(label, labels)}, "
                                  f"but the branches are {list(labels)}")

    def __call__(self, q, k, ctx, labels) -> HeadPlan:
        B, Hkv = k.shape[0], k.shape[1]
        row = self.heads.get(ctx.layer_idx) if ctx.layer_idx is not None else None
        if row is None:
            if self.default is None:
                raise ValueError(f"table router: layer {ctx.layer_idx} is not in the table and no default is set")
            row = [self.default] * Hkv
        total = ctx.kv_heads_total or Hkv  # under tensor parallelism the row covers every rank's heads
        if len(row) != total:
            sharded = f" ({Hkv} on each of {total // Hkv} tensor-parallel ranks)" if total != Hkv else ""
            raise ValueError(f"table router: layer {ctx.layer_idx} lists {len(row)} heads, the layer has {total} "
                             f"KV heads{sharded}")
        row = row[ctx.kv_head_offset: ctx.kv_head_offset + Hkv]
        branch = torch.tensor([labels.index(x) for x in row], device=k.device)
        return HeadPlan(branch.expand(B, Hkv), labels)
