"""Count host synchronisations and kernel-launching ops without a GPU.

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` catches host syncs; on a CPU there is no
device to wait for, so nothing syncs. ``OpProbe`` (a TorchDispatchMode) sees every aten op
instead and flags the ones that *would* wait for the device on a GPU: reading a value
(``.item()``, ``bool(t)``, ``.tolist()`` all dispatch ``aten._local_scalar_dense``), ops whose
output shape depends on values (``nonzero``, boolean indexing, ``masked_select``, ``unique``,
``repeat_interleave`` without ``output_size``) and copies to the host. It also counts the ops
that would launch a kernel (everything but views and metadata), a proxy for launches per layer.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
    aten.is_nonzero.default, aten.equal.default, aten.allclose.default,
}
SYNCING_PACKETS = {"unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}

VIEWS = {
    "view", "_unsafe_view", "reshape", "expand", "transpose", "permute", "slice", "select", "unsqueeze",
    "squeeze", "as_strided", "detach", "alias", "t", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "unflatten", "flatten", "lift_fresh", "view_as", "expand_as", "diagonal", "movedim", "numpy_T", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride", "is_contiguous", "_reshape_alias",
    "_to_copy_noop", "contiguous_noop",
    # host-side scalars wrapped for an op (``torch.where(m, x, -1)``): no kernel
    "scalar_tensor", "lift_fresh_copy",
}


def _is_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or []))


class OpProbe(TorchDispatchMode):
    """``with OpProbe() as p: ...`` then ``p.syncs`` (Counter of op names) and ``p.launches``."""

    def __init__(self):
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()

    @property
    def launches(self) -> int:
        return sum(n for name, n in self.ops.items() if name.split(".")[0] not in VIEWS)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if func in SYNCING or name in SYNCING_PACKETS:
            self.syncs[name] += 1
        elif name == "repeat_interleave" and func != aten.repeat_interleave.self_int \
                and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor) \
                and isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            self.syncs[name] += 1
        elif name in ("index", "index_put", "index_put_") and _is_bool_index(args):
            self.syncs[f"{name}(bool mask)"] += 1
        elif name in ("_to_copy", "copy_") and _to_host(func, args, kwargs):
            self.syncs[f"{name}(to host)"] += 1
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    """A copy from a non-CPU tensor to the CPU (never true on a CPU-only run; kept for GPU runs)."""
    src = args[0] if func.overloadpacket.__name__ == "_to_copy" else args[1]
    dst = kwargs.get("device") if func.overloadpacket.__name__ == "_to_copy" else args[0].device
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
        and torch.device(dst).type == "cpu"


class TracingProbe(OpProbe):
    """An ``OpProbe`` that also keeps where each sync came from (the innermost attnzoo frame)."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = sum(self.syncs.values())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if sum(self.syncs.values()) != before:
            import traceback

            frames = [f for f in traceback.extract_stack() if "/attnzoo/" in f.filename]
            where = f"{frames[-1].filename.split('/attnzoo/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.sites[f"{func.overloadpacket.__name__} @ {where}"] += 1
        return out
