"""Out of memory inside a layer's attention: an error that says what did not fit.

Long context on one GPU meets out-of-memory. torch's own error names an allocation size and the
allocator's state, not which attention call needed it. ``AttentionOutOfMemoryError`` (a
``torch.OutOfMemoryError``, so existing handlers still catch it) names the layer, its node, the
shape and the allocation that failed. It is raised after the failed call's frames are gone, so the
memory that call held is free as soon as the caller has handled the error; the process can take
the next request (tests/test_oom.py checks both on a GPU capped to a small memory fraction).
"""

from __future__ import annotations

import re

import torch

__all__ = ["AttentionOutOfMemoryError", "explain_out_of_memory", "is_out_of_memory"]


class AttentionOutOfMemoryError(torch.OutOfMemoryError):
    """A layer's attention did not fit in memory (the message says where and how much)."""


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA out-of-memory error, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _needed(message: str) -> str:
    m = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]?i?B)", message) or \
        re.search(r"tried to allocate (\d+) bytes", message)
    if m is None:
        return "an allocation (size not reported)"
    size = m.group(1)
    return f"{int(size) / 2**30:.2f} GiB" if size.isdigit() else size


def explain_out_of_memory(message: str, layer_idx, node: str, q: torch.Tensor, k: torch.Tensor
                          ) -> AttentionOutOfMemoryError:
    B, Hq, Nq, D = q.shape
    where = f"{q.device}"
    if q.is_cuda:
        free, total = torch.cuda.mem_get_info(q.device)
        where += f": {free / 2**30:.2f} of {total / 2**30:.2f} GiB free after the failed call was freed"
    return AttentionOutOfMemoryError(
        f"attention of layer {layer_idx} ({node}) ran out of memory at {Nq} queries x {k.shape[2]} keys "
        f"(batch {B}, {Hq}/{k.shape[1]} heads, head dim {D}, {str(q.dtype).replace('torch.', '')}): it needed "
        f"{_needed(message)} more on {where}. The memory the call held is released once this error is handled; "
        "to fit, shorten the prompt or the batch, or use a sparser stack. (torch: "
        f"{message.strip().splitlines()[0][:300]})")
