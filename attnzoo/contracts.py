"""What each kind of component declares, checked when it is registered.

A component is a dataclass registered under a kind. The stack reads these attributes directly;
it never guesses them with ``getattr`` defaults. Required attributes must be declared on the
class. Optional ones get their default written onto the class at registration, so every
registered component carries them:

- **selector** ``(q, k, ctx) -> plan``:
  - ``plan_kind``: ``"block"``, ``"token"`` or ``"dense"``, the plan it returns;
  - ``decode`` (optional, default ``"dense"``): ``"plan"`` if it also places blocks while
    decoding, ``"dense"`` if decoding attends to the whole cache;
  - ``prefill`` (optional, default ``"plan"``): ``"dense"`` for a decode-only selector, whose
    plan for a prompt is dense (``prefill_blocks``);
  - ``block_size`` (optional, default None): the block size its block plans always use, where
    the configuration fixes it (routed layers run such selectors in one mixed launch);
  - ``ranges`` (optional, default None): a method returning ``{"sink", "local", "block_size"}``
    where the pattern is a range rule a kernel can walk without index lists (streaming).
  Registration wraps ``__call__`` with ``check_starts_at_zero``: plans place blocks, strides and
  sinks from position 0, so a selector called directly with a left-padded ``key_padding_mask``
  raises instead of returning a plan that differs from each sequence alone.
- **op** ``(q, k, v, plan, *, key_padding_mask, scale, return_lse) -> out``:
  - ``plan_kinds``: the plan kinds it consumes;
  - ``backend`` (optional, default None): a forced backend name.
- **router** ``(q, k, ctx, labels) -> HeadPlan``:
  - ``needs_pre_rope_keys``: a bool;
  - ``check_labels(labels, path)``;
  - ``check_num_layers`` (optional, default None): a method, or None where any depth is fine.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

PLAN_KINDS = ("block", "token", "dense")
_MISSING = object()


def _one_of(values):
    return lambda v: v in values, f"one of {list(values)}"


def _plan_kinds():
    return (lambda v: isinstance(v, tuple) and bool(v) and all(x in PLAN_KINDS for x in v),
            f"a non-empty tuple of {list(PLAN_KINDS)}")


def _callable():
    return callable, "a method"


def _bool():
    return (lambda v: isinstance(v, bool)), "a bool"


def _optional_method():
    return (lambda v: v is None or callable(v)), "a method or None"


def _optional_int():
    return (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))), "an int or None"


def _optional_str():
    return (lambda v: v is None or isinstance(v, str)), "a backend name or None"


# kind -> attribute -> (check, what it must be, default or _MISSING when required)
CONTRACTS = {
    "selector": {"__call__": (*_callable(), _MISSING), "plan_kind": (*_one_of(PLAN_KINDS), _MISSING),
                 "decode": (*_one_of(("dense", "plan")), "dense"),
                 "prefill": (*_one_of(("dense", "plan")), "plan"),
                 "block_size": (*_optional_int(), None), "ranges": (*_optional_method(), None)},
    "op": {"__call__": (*_callable(), _MISSING), "plan_kinds": (*_plan_kinds(), _MISSING),
           "backend": (*_optional_str(), None)},
    "router": {"__call__": (*_callable(), _MISSING), "needs_pre_rope_keys": (*_bool(), _MISSING),
               "check_labels": (*_callable(), _MISSING), "check_num_layers": (*_optional_method(), None)},
}


def check_component(kind: str, cls: type, name: str) -> None:
    """Raise TypeError naming every missing or ill-typed attribute of ``cls`` for ``kind``; write
    the defaults of optional attributes it does not declare."""
    problems, defaults = [], {}
    # real fields only: ClassVar declarations are listed in __dataclass_fields__ too
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for attr, (ok, what, default) in CONTRACTS[kind].items():
        if attr in fields:  # a dataclass field: its value is per instance, its type was annotated
            continue
        value = getattr(cls, attr, _MISSING) if attr != "__call__" else cls.__dict__.get(attr, _inherited_call(cls))
        if value is _MISSING:
            if default is _MISSING:
                problems.append(f"missing {attr!r} ({what})")
            else:
                defaults[attr] = default
        elif not ok(value):
            problems.append(f"{attr!r} must be {what}, got {value!r}")
    if problems:
        raise TypeError(f"@register({kind!r}, {name!r}) on {cls.__name__}: " + "; ".join(problems)
                        + f" (see attnzoo.contracts for what a {kind} declares)")
    for attr, value in defaults.items():
        setattr(cls, attr, value)
    if kind == "selector" and not getattr(cls.__call__, "checks_left_padding", False):
        cls.__call__ = _left_padding_checked(cls.__call__, name)


def check_starts_at_zero(ctx, selector: str) -> None:
    """Raise ValueError if ``ctx`` (a CallContext, a dict of its fields or None) carries a
    ``key_padding_mask`` where a sequence starts with padding, unless the caller has aligned the
    batch (``ctx.starts_aligned``, set by the stack). Reading the mask is a host sync on a GPU; the
    stack's calls, which are aligned already, skip it."""
    get = ctx.get if isinstance(ctx, dict) else (lambda key, default=None: getattr(ctx, key, default))
    kpm = None if ctx is None else get("key_padding_mask")
    if kpm is None or get("starts_aligned", False) or not isinstance(kpm, torch.Tensor) or kpm.ndim != 2:
        return  # (a malformed mask is named by the selector's own input checks)
    left = ~kpm[:, 0] & kpm.any(-1)
    if bool(left.any()):
        b = int(left.nonzero()[0, 0])
        start = int(kpm[b].to(torch.int8).argmax())
        raise ValueError(
            f"selector {selector!r} got a left-padded key_padding_mask (sequence {b} starts at position {start}): "
            "plans place blocks, strides and sinks from position 0, so this plan would differ from the sequence "
            "alone. Run the selector inside a stack (attnzoo.build({'default': {'selector': ..., 'op': ...}})"
            "(layer, q, k, v, ctx) or attnzoo.patch), which rolls each sequence to start at 0, or roll the batch "
            "yourself with attnzoo.stack.padding.StartAligned and pass CallContext(starts_aligned=True)")


def _left_padding_checked(call, name: str):
    @functools.wraps(call)
    def checked(self, q, k, ctx=None, *args, **kwargs):
        # a static decode step reads nothing on the host; selectors that may run one (decode_by_mask)
        # refuse a left-padded batch at its first step themselves
        if not (getattr(self, "decode_by_mask", False) and getattr(ctx, "static_decode", False)):
            check_starts_at_zero(ctx, name)
        return call(self, q, k, ctx, *args, **kwargs)

    checked.checks_left_padding = True
    return checked


def _inherited_call(cls):
    for base in cls.__mro__[1:]:
        if base is not object and "__call__" in base.__dict__:
            return base.__dict__["__call__"]
    return _MISSING
