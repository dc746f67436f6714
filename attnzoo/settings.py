"""Every switch attnzoo reads, in one table (a leaf module: plans, ops and kernels all read it).

A switch has a name, a type, a default and the environment variable that sets it. Code reads a
switch with ``get(name)``; tests and benchmarks change one with ``override(name=value)`` (a
context manager, local to the thread and context that enters it) instead of assigning module
globals, so one switch cannot leak into another test or thread. The value comes from the
innermost override, else the environment variable, else the default. No switch changes what
another one means: each row's text says all it does. ``attnzoo info`` prints the table with the
current values; the README's table is ``markdown()`` (a test compares them).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

__all__ = ["Setting", "SETTINGS", "get", "override", "rows", "markdown", "cache_root", "value_checks"]

_UNSET = object()


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    type: str  # as the README shows it
    default: object
    parse: Callable[[str], object]  # the variable's text -> value (raises ValueError)
    doc: str

    def from_env(self):
        raw = os.environ.get(self.env)
        if raw is None or raw.strip() == "":
            return self.default
        try:
            return self.parse(raw.strip())
        except ValueError as e:
            raise ValueError(f"{self.env}={raw!r}: {e}") from None


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def _auto_bool(text: str) -> bool | None:
    return None if text.lower() == "auto" else _bool(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("expected a positive whole number")
    return int(text)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text
    return parse


def _op_backends(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"entries must look like op=backend, got {item!r}")
        op, name = (s.strip() for s in item.split("=", 1))
        out[op] = name
    return out


def _split(text: str) -> tuple[bool, int]:
    heads, _, q_split = text.partition(",")
    return _bool(heads), _count(q_split or "1")


def _path(text: str) -> Path:
    return Path(text).expanduser()


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("cache_dir", "ATTNZOO_CACHE", "path", Path.home() / ".cache" / "attnzoo", _path,
            "Converted models and routers trained for a model."),
    Setting("check_values", "ATTNZOO_CHECK_VALUES", "auto, 1 or 0", None, _auto_bool,
            "Read tensor values on the host: plan index checks (ranges, order, causality), exact plan widths, "
            "and the NaN scan where `check_finite` allows it. auto: on the CPU only (on a GPU each read blocks "
            "the host)."),
    Setting("check_finite", "ATTNZOO_CHECK_FINITE", "bool", True, _bool,
            "The NaN/Inf scan of q/k/v, where value checks run; 0 skips only the scan."),
    Setting("backend", "ATTNZOO_BACKEND", "op=backend,...", {}, _op_backends,
            "Force a backend per op (as `backend=` does), e.g. `block_sparse=triton`."),
    Setting("flex_min_len", "ATTNZOO_FLEX_MIN_LEN", "int or unset", None, _count,
            "On a CPU, prefer compiled flex_attention for block-sparse calls from this many keys, within flex's "
            "measured density and length limits; unset: never prefer it."),
    Setting("flashinfer_backend", "ATTNZOO_FLASHINFER_BACKEND", "fa2, fa3 or auto", "fa2",
            _choice("fa2", "fa3", "auto"), "FlashInfer's own kernel family (auto lets it pick fa3 on Hopper)."),
    Setting("triton_interpret", "TRITON_INTERPRET", "bool", False, _bool,
            "Triton's interpreter (read by Triton itself when a kernel is defined): Triton kernels run on the CPU."),
    Setting("attention_tma", "ATTNZOO_ATTENTION_TMA", "bool or auto", None, _auto_bool,
            "Tensor descriptors (TMA) in the Triton attention kernels; auto: on Hopper and newer."),
    Setting("attention_heads_first", "ATTNZOO_ATTENTION_HEADS_FIRST", "bool", True, _bool,
            "The Triton attention grid's first axis runs over batch x heads (else over query tiles)."),
    Setting("attention_key_major_backward", "ATTNZOO_ATTENTION_KEY_MAJOR_BACKWARD", "bool or auto", None,
            _auto_bool, "dK/dV from the key-major kernel; auto: when its grid fills the GPU."),
    Setting("attention_backward_split", "ATTNZOO_ATTENTION_BACKWARD_SPLIT", "heads,q_split or unset", None, _split,
            "The key-major backward's (split heads, query split), overriding the launch config."),
    Setting("scores_tma", "ATTNZOO_SCORES_TMA", "bool or auto", None, _auto_bool,
            "Tensor descriptors in the Triton antidiagonal scorer; auto: on Hopper and newer."),
    Setting("scores_gemm", "ATTNZOO_SCORES_GEMM", "bool or auto", None, _auto_bool,
            "The antidiagonal scorer's reduced product through cuBLAS; auto: CUDA with 16-bit inputs."),
    Setting("select_radix", "ATTNZOO_SELECT_RADIX", "bool or auto", None, _auto_bool,
            "The Triton top-n selection's cut by 16-bin histograms (8 steps) instead of a 31-step binary search; "
            "auto: decode steps only."),
    Setting("cpu_score_chunk_tokens", "ATTNZOO_CPU_SCORE_CHUNK_TOKENS", "int", 512, _count,
            "Query tokens (times batch) the CPU antidiagonal scorer takes per chunk."),
    Setting("layout_chunk_elements", "ATTNZOO_LAYOUT_CHUNK_ELEMENTS", "int", 1 << 21, _count,
            "Padded score elements per chunk of the CPU block-sparse path."),
    Setting("cuda_graphs", "ATTNZOO_CUDA_GRAPHS", "bool", False, _bool,
            "Replay each layer's attention call (selection + attention) from a CUDA graph, captured on the second "
            "prefill of a shape (attnzoo.stack.graphs); calls that cannot be captured run eagerly."),
    Setting("max_head_runs", "ATTNZOO_MAX_HEAD_RUNS", "int", 4, _count,
            "A routed layer with more runs of consecutive heads per branch gathers its pairs into one call."),
    Setting("fuzz_profile", "ATTNZOO_FUZZ", "ci, long or gpu", "ci", _choice("ci", "long", "gpu"),
            "tests/fuzz: how many cases to draw, and on which device."),
    Setting("fuzz_report", "ATTNZOO_FUZZ_REPORT", "path or unset", None, _path,
            "tests/fuzz: write the campaign's report (counts per backend) here."),
    Setting("bench_out", "ATTNZOO_BENCH_OUT", "path or unset", None, _path,
            "bench/: write the benchmark results JSON here."),
)}

# a fresh dict per override (never mutated), so a context sees only the overrides it entered
_OVERRIDES: contextvars.ContextVar[Mapping] = contextvars.ContextVar("attnzoo_settings", default=MappingProxyType({}))


def _setting(name: str) -> Setting:
    s = SETTINGS.get(name)
    if s is None:
        raise ValueError(f"unknown setting {name!r}; settings: {sorted(SETTINGS)}")
    return s


def get(name: str):
    """The value of switch ``name``: the innermost override, else its variable, else the default."""
    value = _OVERRIDES.get().get(name, _UNSET)
    if value is not _UNSET:
        return value
    return _setting(name).from_env()


@contextlib.contextmanager
def override(**values) -> Iterator[None]:
    """Set switches inside the block, in this thread (and context) only: ``with
    override(check_values=True): ...``. A value given as text is parsed as its variable would be."""
    parsed = {}
    for name, value in values.items():
        s = _setting(name)
        parsed[name] = s.parse(value) if isinstance(value, str) else value
    token = _OVERRIDES.set({**_OVERRIDES.get(), **parsed})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def rows() -> list[dict]:
    """Every switch with its current value and where the value comes from."""
    out = []
    for s in SETTINGS.values():
        if s.name in _OVERRIDES.get():
            source = "override"
        elif os.environ.get(s.env, "").strip():
            source = "environment"
        else:
            source = "default"
        try:
            value = _shown(get(s.name), s)
        except ValueError as e:  # a bad variable: shown (every read of it raises the same)
            value, source = f"invalid ({e})", "environment"
        out.append({"name": s.name, "env": s.env, "type": s.type, "default": _shown(s.default, s),
                    "value": value, "source": source, "doc": s.doc})
    return out


def _shown(value, setting: Setting) -> str:
    if value is None:
        return "auto" if "auto" in setting.type else "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return "~/" + str(value.relative_to(Path.home()))
    return str(value)


def markdown() -> str:
    """The README's settings table (defaults, not this process's values)."""
    lines = ["| variable | setting | type | default | what it does |", "|---|---|---|---|---|"]
    for s in SETTINGS.values():
        lines.append(f"| `{s.env}` | `{s.name}` | {s.type} | {_shown(s.default, s)} | {s.doc} |")
    return "\n".join(lines)


def cache_root() -> Path:
    """Where attnzoo keeps converted models and routers trained for a model (``cache_dir``)."""
    return Path(get("cache_dir"))


def value_checks(device) -> bool:
    """Whether attnzoo reads tensor values on the host for ``device`` (``check_values``): the
    content checks of a plan's indices (ranges, order, causality), exact plan widths, and the NaN
    scan of q/k/v (unless ``check_finite`` is off).

    Shapes, dtypes and devices are always checked. On the CPU reading values needs no sync, only
    the scans themselves (torch.profiler of one XAttention selector call at 3K tokens, 9/3 heads,
    two cores: ~20 of ~50 ms in the isfinite/index-check ops); on a GPU each check blocks the host
    until the kernels before it finish, which makes a prefill host-bound. So by default they run
    on the CPU only; 1 turns them on everywhere (debugging a GPU run), 0 off everywhere.
    """
    on = get("check_values")
    if on is not None:
        return on
    return torch.device(device).type == "cpu"
