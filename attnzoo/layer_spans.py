"""Layer keys of a stack: explicit (``"3"``, ``"0-11"``) or relative to the model's depth.

Relative keys let one preset fit models of any depth:

- ``first:N`` — the first N layers; ``last:N`` — the last N;
- ``from:X`` — from layer X to the last; ``until:X`` — layer 0 up to, not including, X;
  X is a layer index (``from:4``) or, written with a decimal point, a fraction of the depth
  (``from:0.5`` is the second half: layers 15-29 of 30, 8-15 of 16).

A relative key resolves when the stack meets a model (``LayerStack.for_model``).
"""

from __future__ import annotations

import re

from .config import ConfigError

__all__ = ["parse_layer_key", "resolve_layer_key", "range_key"]

_EXPLICIT = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_RELATIVE = re.compile(r"\s*(first|last|from|until)\s*:\s*([0-9.]+)\s*")
HELP = "'3', '0-11', 'first:2', 'last:4', 'from:0.5' (a fraction of the depth) or 'from:4' (a layer index)"


def range_key(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def parse_layer_key(key, path: str) -> tuple[int, int] | str:
    """``(lo, hi)`` for an explicit key, the normalised text (``"from:0.5"``) for a relative one."""
    text = str(key)
    m = _EXPLICIT.fullmatch(text)
    if m:
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{path}: layer range {key!r} is empty (end before start)")
        return lo, hi
    m = _RELATIVE.fullmatch(text)
    if not m:
        raise ConfigError(f"{path}: layer key {key!r} must look like {HELP}")
    kind, value = m.groups()
    if kind in ("first", "last"):
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{path}: {kind}:N needs a whole number of layers >= 1, got {value!r}")
    else:
        try:
            x = float(value)
        except ValueError:
            raise ConfigError(f"{path}: {kind}:X needs a layer index or a fraction, got {value!r}") from None
        if "." in value and not 0 < x < 1:
            raise ConfigError(f"{path}: {kind}:{value}: a fraction of the depth must lie strictly between 0 and 1")
    return f"{kind}:{value}"


def resolve_layer_key(key: str, num_layers: int, path: str) -> tuple[int, int]:
    """``(lo, hi)`` of a relative key on a model with ``num_layers`` layers."""
    kind, value = key.split(":")
    n = num_layers

    def index(v: str) -> int:
        return int(float(v) * n + 0.5) if "." in v else int(v)

    if kind == "first":
        lo, hi = 0, int(value) - 1
    elif kind == "last":
        lo, hi = n - int(value), n - 1
    elif kind == "from":
        lo, hi = index(value), n - 1
    else:
        lo, hi = 0, index(value) - 1
    if lo < 0 or hi >= n or hi < lo:
        raise ValueError(f"{path}: layer key {key!r} does not fit a {n}-layer model (0-{n - 1}): it "
                         f"selects {lo}-{hi}")
    return lo, hi
