"""Intervals for per-prompt scores: bootstrap over prompts, alone and paired with full attention.

Prompts are the unit of resampling: the tokens of one copy prompt share its distance and text,
so treating them as independent would make intervals far too narrow.
"""

from __future__ import annotations

import torch

RESAMPLES = 2000


def _resample_means(values: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (n, len(values)), generator=g)
    return values[idx].mean(1)


def bootstrap_ci(values, *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per prompt)."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if v.numel() == 1:
        return float(v[0]), float(v[0])
    means = _resample_means(v, resamples, seed)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    m = float(v.mean())  # the interval holds the mean (percentiles of few distinct values can miss it)
    return min(float(lo), m), max(float(hi), m)


def paired_difference(values, full, **kw) -> dict:
    """Mean of ``values - full`` over the same prompts, with its bootstrap interval: a difference
    whose interval excludes 0 is one the prompts can tell."""
    a = [float(x) for x in values]
    b = [float(x) for x in full]
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs one value per prompt on both sides, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    lo, hi = bootstrap_ci(d, **kw)
    return {"mean": sum(d) / len(d), "ci": [lo, hi]}
