"""Backend capability declarations and first-fit dispatch with reasons.

Each backend says which devices, dtypes, head dims and plan kinds it handles, whether it
returns the log-sum-exp and supports backward, and how close to the fp32 reference it is
per dtype. ``choose`` takes the first backend (in registration priority) that fits the
request; when none fits it raises one error listing every backend and why it declined.

Force a backend with the ``backend=`` argument of an op, or the environment variable
``ATTNZOO_BACKEND`` (``"block_sparse=blocked,dense=sdpa"``). A forced backend that cannot
run raises instead of silently falling back.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import settings
from ..caches import LRUDict

__all__ = ["Backend", "Request", "NoBackendError", "register_backend", "backends", "choose",
           "explain", "Tolerance"]


@dataclass(frozen=True)
class Tolerance:
    """Max relative error vs the fp32 reference: max|x - ref| / max|ref|."""

    out: float
    lse: float
    grad: float


DEFAULT_TOLERANCES = {
    torch.float32: Tolerance(out=1e-4, lse=1e-4, grad=1e-3),
    torch.float16: Tolerance(out=5e-3, lse=2e-3, grad=1e-2),
    torch.bfloat16: Tolerance(out=2e-2, lse=1e-2, grad=5e-2),
}


@dataclass(frozen=True)
class Request:
    """What a call needs; built by the op from its inputs."""

    op: str
    device: str
    dtype: torch.dtype
    head_dim: int
    plan_kind: str
    needs_grad: bool = False
    needs_lse: bool = False
    has_padding: bool = False
    causal: bool = True
    q_len: int = 0
    kv_len: int = 0
    q_heads: int = 0
    kv_heads: int = 0
    plan_heads: int = 0
    plan_density: float | None = None
    block_size: tuple[int, int] | None = None  # (block_q, block_k) of a block plan
    stride: int | None = None  # the antidiagonal stride of an XAttention scoring call
    row_lengths: bool = False  # dense: per-head real rows given (the rows past them are padded slots)


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    plan_kinds: tuple[str, ...]
    backward: bool
    lse: bool
    head_dims: tuple[int, ...] | None = None  # None: any
    padding: bool = True
    # dense: skips the rows past each head's ``row_lengths`` (the others attend over them; their
    # output there is unspecified either way, so every backend is correct)
    row_lengths: bool = False
    description: str = ""
    tolerances: dict = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    available: Callable[[], str | None] = lambda: None  # reason it cannot run on this machine
    device_check: Callable[[str], str | None] | None = None  # e.g. "CPU only under the interpreter"
    check: Callable[[Request], str | None] | None = None  # further request-specific limits
    # a measured performance preference: consulted for automatic choice, ignored when forced
    prefer: Callable[[Request], str | None] | None = None

    def reasons(self, req: Request, forced: bool = False) -> list[str]:
        """Every reason this backend declines ``req`` (empty: it can serve it). A measured
        preference (``prefer``) is asked only of a capable backend, and never when forced."""
        out = []
        missing = self.available()
        if missing:
            out.append(missing)
        if req.device not in self.devices:
            out.append(f"device {req.device} not in {list(self.devices)}")
        elif self.device_check and (why := self.device_check(req.device)):
            out.append(why)
        if req.dtype not in self.dtypes:
            out.append(f"dtype {req.dtype} not in {[str(d) for d in self.dtypes]}")
        if self.head_dims is not None and req.head_dim not in self.head_dims:
            out.append(f"head dim {req.head_dim} not in {list(self.head_dims)}")
        if req.plan_kind not in self.plan_kinds:
            out.append(f"plan kind {req.plan_kind!r} not in {list(self.plan_kinds)}")
        if req.needs_grad and not self.backward:
            out.append("no backward (inputs require grad)")
        if req.needs_lse and not self.lse:
            out.append("does not return lse (return_lse=True)")
        if req.has_padding and not self.padding:
            out.append("no key_padding_mask support")
        if not out and self.check and (why := self.check(req)):  # request-specific limits assume the basics
            out.append(why)
        if not out and not forced and self.prefer is not None and (why := self.prefer(req)):
            out.append(why)
        return out

    def why_not(self, req: Request, forced: bool = False) -> str | None:
        """None if this backend can serve ``req`` (and, unless forced, prefers to), else every
        reason it declines, joined by '; '."""
        out = self.reasons(req, forced)
        return "; ".join(out) if out else None

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        return self.tolerances[dtype]


class NoBackendError(RuntimeError):
    pass


_BACKENDS: dict[str, list[Backend]] = {}


# The dispatch table: per op, the order in which built-in backends are tried (the first that fits
# runs). It is the one place that decides precedence; registration order and import order do not.
# Why this order: faster where capable first (measured on an H100, see README "Backends");
# FlashInfer after SDPA's default dispatch for dense (cuDNN/FA3-class measured faster on Hopper),
# the Triton kernels before FlashInfer and flex for block_sparse; torch references last. For dense
# calls that name per-head real rows (Token Sparse's compressed tensors at a static width)
# ``triton_rows`` comes before SDPA: it skips the padded rows, which SDPA would attend over.
PRIORITY: dict[str, tuple[str, ...]] = {
    "dense": ("sdpa", "triton_rows", "sdpa_cuda", "flashinfer", "triton", "blocked"),
    "block_sparse": ("triton_decode", "triton_grouped", "triton", "flashinfer", "flex", "blocked"),
    "mixed": ("triton", "blocked"),
    "antidiagonal_scores": ("triton", "torch"),
    "pooled_scores": ("triton", "torch"),
    "block_select": ("triton", "torch"),
    "page_scores": ("triton", "torch"),
    "head_router": ("triton", "torch"),
}


def register_backend(backend: Backend, before: str | None = None) -> Backend:
    """Add a backend. Built-ins take their place from ``PRIORITY``; a backend the table does not
    name (a user's) goes after them, or ahead of the registered backend named by ``before``."""
    lst = _BACKENDS.setdefault(backend.op, [])
    if any(b.name == backend.name for b in lst):
        raise ValueError(f"backend {backend.name!r} already registered for op {backend.op!r}")
    names = [b.name for b in lst]
    if before is not None and before not in names:
        raise ValueError(f"backend {before!r} is not registered for op {backend.op!r}: {names}")
    lst.insert(names.index(before) if before is not None else len(lst), backend)
    order = PRIORITY.get(backend.op, ())
    if before is None:  # stable: table names first in table order, then the others as registered
        lst.sort(key=lambda b: order.index(b.name) if b.name in order else len(order))
    _CHOSEN.clear()
    return backend


def backends(op: str | None = None) -> list[Backend]:
    """Registered backends in dispatch order (of one op, or of every op)."""
    if op is None:
        return [b for lst in _BACKENDS.values() for b in lst]
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; ops with backends: {sorted(_BACKENDS)}")
    return list(_BACKENDS[op])


def forced_backend(op: str, backend: str | None) -> str | None:
    if backend is not None:
        return backend
    forced = settings.get("backend")
    for k, v in forced.items():
        if k not in _BACKENDS:
            close = difflib.get_close_matches(k, list(_BACKENDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"ATTNZOO_BACKEND names op {k!r}, which has no backends{hint}. "
                             f"Ops: {sorted(_BACKENDS)}")
        if k == op:
            return v
    return None


def explain(req: Request) -> list[tuple[str, str | None]]:
    """Every backend of ``req.op`` with None (fits) or the reason it declines."""
    return [(b.name, b.why_not(req)) for b in backends(req.op)]


_CHOSEN = LRUDict(4096, "ops.dispatch.choose")  # (request, forced name) -> backend, for GPU requests


def choose(req: Request, backend: str | None = None) -> Backend:
    name = forced_backend(req.op, backend)
    if req.device != "cpu":
        # a GPU prefill asks the same question every layer; the answer depends only on the request
        # and the registry (CPU answers also depend on the flex compile state, so they are not kept)
        key = (req, name)
        hit = _CHOSEN.get(key)
        if hit is None:
            hit = _CHOSEN[key] = _choose(req, name)
        return hit
    return _choose(req, name)


def _choose(req: Request, name: str | None) -> Backend:
    cands = backends(req.op)
    if name is not None:
        by_name = {b.name: b for b in cands}
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"backend {name!r} is not registered for op {req.op!r}{hint}. "
                f"Registered: {sorted(by_name)}")
        why = by_name[name].why_not(req, forced=True)
        if why:
            raise NoBackendError(f"forced backend {name!r} for {req.op} cannot run this call: {why}")
        return by_name[name]
    for b in cands:
        if b.why_not(req) is None:
            return b
    lines = "\n".join(f"  - {n}: {why}" for n, why in explain(req))
    raise NoBackendError(
        f"no {req.op} backend fits (device={req.device}, dtype={req.dtype}, head_dim="
        f"{req.head_dim}, plan={req.plan_kind}, grad={req.needs_grad}, lse={req.needs_lse}):\n{lines}")


def make_request(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_kind: str, *,
                 return_lse: bool, key_padding_mask, causal: bool, plan_heads: int = 0,
                 plan_density: float | None = None, block_size: tuple[int, int] | None = None,
                 stride: int | None = None, row_lengths: bool = False) -> Request:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return Request(op=op, device=q.device.type, dtype=q.dtype, head_dim=q.shape[-1],
                   plan_kind=plan_kind, needs_grad=needs_grad, needs_lse=return_lse,
                   has_padding=key_padding_mask is not None, causal=causal, q_len=q.shape[2],
                   kv_len=k.shape[2], q_heads=q.shape[1], kv_heads=k.shape[1],
                   plan_heads=plan_heads or q.shape[1], plan_density=plan_density, block_size=block_size,
                   stride=stride, row_lengths=row_lengths)
