"""Per-shape caches, each with a size bound, in one registry that ``clear_caches()`` empties.

The hot path keeps what depends only on shapes (causal block sets, mode tables, streaming plans,
dispatch answers, a routed layer's measured path): built once, reused by every layer. A server
sees a new prompt length on nearly every request, so every such cache is an LRU with a bound:
memory stays flat however many lengths pass (tests/test_serving.py runs 300), and
``clear_caches()`` frees them all (e.g. before measuring memory, or after a model is unloaded).
Both kinds are safe to use from several threads. A leaf module: it imports nothing from attnzoo.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["shape_cache", "LRUDict", "clear_caches", "cache_info", "device_constant"]

_FUNCTIONS: dict[str, Callable] = {}  # qualified name -> lru_cache-wrapped function
_DICTS: weakref.WeakSet = weakref.WeakSet()  # live LRUDicts (per-object caches, e.g. routed layers')


def shape_cache(maxsize: int):
    """``functools.lru_cache(maxsize)`` (thread-safe), registered for ``clear_caches`` and
    ``cache_info``."""
    if not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")

    def deco(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _FUNCTIONS[f"{fn.__module__}.{fn.__qualname__}"] = cached
        return cached

    return deco



@shape_cache(512)
def device_constant(values: tuple, dtype, device: str):
    """A 1-D tensor of the ints ``values`` on ``device``, made once per (values, dtype, device) and
    kept, so the same object comes back (kernel wrappers key their converted copies by identity). It
    is filled on the device: ``torch.tensor`` from host values would be a blocking copy."""
    import torch  # (a leaf: imported when first used)

    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, x in enumerate(values):
        out[i] = x
    return out

class LRUDict:
    """A mapping that keeps the ``maxsize`` most recently used entries; every method takes a lock,
    so threads may share it."""

    def __init__(self, maxsize: int, name: str):
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        self.maxsize, self.name = maxsize, name
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        _DICTS.add(self)

    def get(self, key, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def __getitem__(self, key):
        with self._lock:
            self._data.move_to_end(key)
            return self._data[key]

    def __setitem__(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> list:
        with self._lock:
            return list(self._data.items())

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def clear_caches() -> None:
    """Empty every per-shape cache attnzoo keeps (functions and live per-object caches)."""
    for fn in _FUNCTIONS.values():
        fn.cache_clear()
    for d in list(_DICTS):
        d.clear()


def cache_info() -> dict[str, tuple[int, int]]:
    """``{name: (entries, bound)}`` of every registered cache (per-object ones summed by name)."""
    out = {name: (fn.cache_info().currsize, fn.cache_info().maxsize) for name, fn in _FUNCTIONS.items()}
    for d in list(_DICTS):
        n, bound = out.get(d.name, (0, 0))
        out[d.name] = (n + len(d), bound + d.maxsize)
    return out
