"""Switches read from the environment (a leaf module: plans and ops both read it)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cache_root() -> Path:
    """Where attnzoo keeps converted models and routers trained for a model (``ATTNZOO_CACHE``,
    default ``~/.cache/attnzoo``)."""
    return Path(os.environ.get("ATTNZOO_CACHE", Path.home() / ".cache" / "attnzoo"))


def value_checks(device) -> bool:
    """Whether attnzoo reads tensor values on the host for ``device``: the NaN/Inf scan of q/k/v,
    the content checks of a plan's indices (ranges, order, causality), exact plan widths.

    Shapes, dtypes and devices are always checked. On the CPU reading values needs no sync, only
    the scans themselves (torch.profiler of one XAttention selector call at 3K tokens, 9/3 heads,
    two cores: ~20 of ~50 ms in the isfinite/index-check ops); on a GPU each check blocks the host
    until the kernels before it finish, which makes a prefill host-bound. So by default they run
    on the CPU only. ``ATTNZOO_CHECK_VALUES=1`` turns them on everywhere (debugging a GPU run),
    ``0`` off everywhere. ``ATTNZOO_CHECK_FINITE=0`` (older name) also turns off the NaN scan.
    """
    env = os.environ.get("ATTNZOO_CHECK_VALUES", "auto")
    if env not in ("auto", "0", "1"):
        raise ValueError(f"ATTNZOO_CHECK_VALUES must be auto, 0 or 1, got {env!r}")
    if env != "auto":
        return env == "1"
    return torch.device(device).type == "cpu"
