"""Triton availability and the interpreter switch, shared by every Triton kernel.

Kernel modules are imported lazily (at first call): Triton reads ``TRITON_INTERPRET`` when a
``@triton.jit`` function is defined, so importing them eagerly would freeze the mode at
``import attnzoo`` time.

Every kernel lists its sequence-length arguments in ``do_not_specialize``: Triton otherwise
compiles one variant for lengths divisible by 16 and another for the rest, and a prompt of
32,767 tokens after one of 32,768 paid a fresh compile inside its prefill (0.8-1.7 s on an H100
in ``attnzoo compare``, against ~0.1 s). Strides and pointers keep their specialisation.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ... import settings


def interpreting() -> bool:
    return settings.get("triton_interpret")


@functools.lru_cache(maxsize=1)
def triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'attnzoo[gpu]')"
    return None


def triton_reason(device: str) -> str | None:
    """Why a Triton kernel cannot run on ``device`` here (None: it can)."""
    missing = triton_missing()
    if missing:
        return missing
    if device == "cpu" and not interpreting():
        return "on CPU only under the Triton interpreter (TRITON_INTERPRET=1)"
    return None


def interpreter_preference(req) -> str | None:
    # the interpreter is a test vehicle (~ms per tile): never pick it automatically
    if req.device == "cpu":
        return "Triton interpreter on CPU is for testing: force it with backend='triton'"
    return None


def tma_fits(*ts) -> bool:
    """TMA needs a 16-byte aligned base and 16-byte multiple strides (last stride 1)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in ts)


def tma_capable(device, forced: bool | None = None) -> bool:
    """Whether tensor descriptors (TMA) run on ``device``: Hopper or newer, not under the
    interpreter; ``forced`` (a kernel's ``*_tma`` setting) overrides, so tests can check the TMA
    path under the interpreter."""
    if forced is not None:
        return forced
    return (not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def tile(block: int, cap: int = 64) -> int | None:
    """Largest power of two <= cap, >= 16, dividing ``block`` (None if there is none)."""
    t = cap
    while t >= 16:
        if block % t == 0:
            return t
        t //= 2
    return None
