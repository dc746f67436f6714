"""One registry per kind of component (op, selector, router); typed, buildable from configs.

    @attnzoo.register("selector", "my_method")
    @dataclass
    class MyMethod:
        threshold: float = 0.9
        def __call__(self, q, k, ctx=None) -> BlockPlan: ...

    attnzoo.create("selector", {"name": "my_method", "threshold": 0.8})

Field types are checked from the dataclass annotations; range checks belong in the
component's ``__post_init__`` (raise ValueError naming the field). What each kind declares
(``plan_kind``, ``needs_pre_rope_keys``, ...) is checked at registration (``attnzoo.contracts``).
Every registered component is picked up by the test matrix and the benchmark suite.
"""

from __future__ import annotations

import dataclasses

from .config import ConfigError, check_fields, suggest
from .contracts import check_component

__all__ = ["KINDS", "PLUGIN_GROUP", "register", "create", "get", "available", "plugins", "to_config", "unregister"]

KINDS = ("op", "selector", "router")

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}{suggest(kind, KINDS)}. Kinds: {list(KINDS)}")


def register(kind: str, name: str):
    """Class decorator: make a dataclass buildable as ``{"name": name, **fields}``."""
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string")

    def deco(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"@register({kind!r}, {name!r}) needs a dataclass, got {cls.__name__}")
        if "name" in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"{cls.__name__}: 'name' is reserved for the registry key")
        check_component(kind, cls, name)  # TypeError naming what is missing; optional defaults written
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is already registered by {existing.__qualname__}")
        cls.registry_kind, cls.registry_name = kind, name
        _REGISTRY[kind][name] = cls
        return cls

    return deco


def unregister(kind: str, name: str) -> None:
    """Remove a component (tests and notebooks that redefine one)."""
    _check_kind(kind)
    _REGISTRY[kind].pop(name, None)


def available(kind: str) -> list[str]:
    _check_kind(kind)
    _load_builtins()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str, path: str = "") -> type:
    _check_kind(kind)
    _load_builtins()
    reg = _REGISTRY[kind]
    if name not in reg:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}unknown {kind} {name!r}{suggest(name, reg)}. "
                          f"Registered {kind}s: {sorted(reg)}")
    return reg[name]


def create(kind: str, spec, path: str = ""):
    """Build a registered component from ``"name"``, ``{"name": ..., **fields}`` or an instance."""
    _check_kind(kind)
    if isinstance(spec, str):
        spec = {"name": spec}
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        if getattr(spec, "registry_kind", None) != kind:
            raise TypeError(f"{path or kind}: {type(spec).__name__} is not a registered {kind}")
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{path or kind}: expected a name or a mapping with 'name', got {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"{path or kind}: missing 'name'. Registered {kind}s: {available(kind)}")
    name = spec["name"]
    cls = get(kind, name, _join(path, "name"))
    fields = {k: v for k, v in spec.items() if k != "name"}
    values = check_fields(cls, fields, path, what=f"{kind} {name!r}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{path or kind + ' ' + repr(name)}: {e}") from e


def to_config(obj) -> dict:
    """``{"name": ..., **fields}`` for a registered component (inverse of ``create``)."""
    if not hasattr(obj, "registry_name"):
        raise TypeError(f"{type(obj).__name__} is not a registered component")
    out = {"name": obj.registry_name}
    for f in dataclasses.fields(obj):
        if f.init:
            out[f.name] = getattr(obj, f.name)
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_LOADED = False


PLUGIN_GROUP = "attnzoo.plugins"
_PLUGIN_ERRORS: dict[str, str] = {}  # entry point -> why it did not load


def _load_builtins() -> None:
    """Import the packages whose modules register built-in components, then every plugin: a
    module named by an entry point in the ``attnzoo.plugins`` group, e.g. in its pyproject.toml

        [project.entry-points."attnzoo.plugins"]
        my_method = "my_package.my_method"

    A plugin that fails to import is reported (a warning, and ``attnzoo info``), not fatal: one
    broken third-party package must not take every other method down with it."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import routers, selectors  # noqa: F401
    from .ops import components  # noqa: F401

    _load_plugins()


def _load_plugins() -> None:
    import importlib.metadata
    import warnings

    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - any import failure of foreign code is reported
            _PLUGIN_ERRORS[f"{ep.name} = {ep.value}"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"attnzoo plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=3)


def plugins() -> dict[str, str | None]:
    """Every plugin entry point: ``"name = module"`` -> None if it loaded, else why not."""
    import importlib.metadata

    _load_builtins()
    eps = importlib.metadata.entry_points(group=PLUGIN_GROUP)
    return {f"{ep.name} = {ep.value}": _PLUGIN_ERRORS.get(f"{ep.name} = {ep.value}") for ep in eps}
