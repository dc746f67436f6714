"""Configs: YAML/dict in, typed dataclass fields checked against their annotations.

Errors carry the dotted path of the offending key (``layers.15-28.inner.selector.threshold``)
and, for unknown names or keys, the closest valid spelling.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_config", "dump_config", "check_fields", "suggest", "ConfigError"]


class ConfigError(ValueError):
    """A config is malformed; the message names the path and what was expected."""


def suggest(word: str, options) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Return ``value`` converted to ``tp`` where that is lossless, else raise ConfigError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError:
                continue  # the next member may take it; the message below names them all
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}{suggest(value, args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(args, value, strict=True)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, path): _coerce(v, vt, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    return value


def check_fields(cls, data: dict, path: str = "", what: str | None = None) -> dict:
    """Validate ``data`` against dataclass ``cls``'s fields: unknown/missing keys, types.

    Returns a dict of coerced values ready for ``cls(**values)``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    what = what or cls.__name__
    out = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{_join(path, str(key))}: unknown key for {what}{suggest(key, fields)}. "
                f"Valid keys: {sorted(fields)}")
        out[key] = _coerce(value, hints.get(key, Any), _join(path, key))
    missing = [n for n, f in fields.items() if n not in out
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path or what}: missing required key(s) {missing} for {what}")
    return out


def _preset_dir():
    return resources.files("attnzoo") / "presets"


def preset_names() -> list[str]:
    d = _preset_dir()
    if not d.is_dir():
        return []
    return sorted(p.name.rsplit(".", 1)[0] for p in d.iterdir() if p.name.endswith(".yaml"))


def preset_spec(preset: str) -> str:
    """What ``build`` takes for a command-line preset: a stack file path as it is (it must exist),
    ``preset:NAME`` for a shipped preset name; anything else raises ConfigError with a suggestion."""
    if preset.endswith((".yaml", ".yml", ".json")):
        if not Path(preset).is_file():
            raise ConfigError(f"stack file not found: {preset}")
        return preset
    if preset.startswith("preset:"):
        return preset
    if preset not in preset_names():
        raise ConfigError(f"unknown preset {preset!r}{suggest(preset, preset_names())}. Presets: {preset_names()} "
                          f"(or a path to a stack YAML)")
    return f"preset:{preset}"


def _parse(text: str, where: str, json_text: bool = False):
    """YAML (or JSON) text to Python data; a syntax error becomes one ConfigError naming ``where``
    and the line, instead of the parser's traceback."""
    try:
        return json.loads(text) if json_text else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None


def load_config(src) -> dict:
    """A config dict from a dict, a ``.yaml``/``.yml``/``.json`` path, YAML text, or
    ``"preset:NAME"`` (a file shipped in ``attnzoo/presets``)."""
    if isinstance(src, dict):
        return dict(src)
    if isinstance(src, Path) or (isinstance(src, str) and src.endswith((".yaml", ".yml", ".json"))
                                 and "\n" not in src):
        p = Path(src)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = _parse(p.read_text(), str(p), json_text=p.suffix == ".json")
    elif isinstance(src, str) and src.startswith("preset:"):
        name = src.split(":", 1)[1]
        names = preset_names()
        if name not in names:
            raise ConfigError(f"unknown preset {name!r}{suggest(name, names)}. Presets: {names}")
        data = _parse((_preset_dir() / f"{name}.yaml").read_text(), f"preset {name!r}")
    elif isinstance(src, str):
        data = _parse(src, "YAML text")
    else:
        raise TypeError(f"config must be a dict, a path, YAML text or 'preset:NAME', got {type(src).__name__}")
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    return data


def without_dense_below(spec):
    """A stack config with every ``dense_below`` switch removed, so each node runs its sparse path
    at every length: what the method itself does, as opposed to the speed-tuned preset (the switch
    runs dense attention where the sparse path measured slower)."""
    if isinstance(spec, dict):
        return {k: without_dense_below(v) for k, v in spec.items() if k != "dense_below"}
    if isinstance(spec, list):
        return [without_dense_below(v) for v in spec]
    return spec


class _PlainDumper(yaml.SafeDumper):
    """No ``&id001`` anchors: a dict shared by several layers is written out at each of them, so a
    stack file reads layer by layer."""

    def ignore_aliases(self, data):
        return True


def dump_config(data: dict) -> str:
    """YAML text for a config dict (round-trips through ``load_config``)."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)
