"""What a stack may depend on in a model: its attention geometry and its name.

A stack's model-specific parts (per-head thresholds, a per-KV-head table, a router's weights, a
layer list from a calibration) fit one geometry. ``ModelShape`` is that geometry, read from a
Hugging Face config, so a stack can say what it was fitted to and refuse — naming the part and
the command that refits it — when it meets another model, instead of failing deep in a layer call.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["ModelShape", "model_name"]

_QUANT_SUFFIX = re.compile(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16|gguf)$")


def model_name(path_or_name: str) -> str:
    """A model's name as attnzoo keys fitted files by: the folder or file name, lower case, without
    a quantisation suffix (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``), so the
    embedded model and its GGUF loaded by path are one model."""
    name = Path(str(path_or_name).rstrip("/")).name.lower()
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    while True:
        stripped = _QUANT_SUFFIX.sub("", name)
        if stripped == name:
            return name
        name = stripped


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of a decoder: layers, query heads, KV heads, head dim (and a name)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    name: str = ""

    def __post_init__(self):
        for f in ("layers", "heads", "kv_heads", "head_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelShape.{f} must be an integer >= 1, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelShape: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def of(cls, model) -> ModelShape:
        """The shape of a transformers model (or of its config)."""
        cfg = getattr(model, "config", model)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        try:
            layers, heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
        except AttributeError as e:
            raise TypeError(f"cannot read an attention geometry from {type(cfg).__name__}: {e}") from None
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        name = getattr(model, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or ""
        return cls(layers, heads, int(kv), int(head_dim), model_name(name) if name else "")

    @classmethod
    def from_config(cls, data: dict, path: str = "fitted_for") -> ModelShape:
        from .config import check_fields

        return cls(**check_fields(cls, {"name": "", **{k: v for k, v in data.items() if k in _FIELDS}}, path))

    def to_config(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name" or v}

    def differences(self, other: ModelShape) -> list[str]:
        """What differs in the geometry (the name aside): ``["9 query heads vs 4", ...]``."""
        words = {"layers": "layers", "heads": "query heads", "kv_heads": "KV heads", "head_dim": "head dim"}
        return [f"{words[f]} {getattr(self, f)} vs {getattr(other, f)}" for f in words
                if getattr(self, f) != getattr(other, f)]

    def describe(self) -> str:
        geo = f"{self.layers} layers, {self.heads} query / {self.kv_heads} KV heads, head dim {self.head_dim}"
        return f"{self.name} ({geo})" if self.name else f"a model with {geo}"


_FIELDS = {f.name for f in fields(ModelShape)}
