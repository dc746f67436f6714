"""GPU kernels: Triton (block-sparse / mixed-mode attention, XAttention scoring) and FlashInfer.

Only capability declarations live here; the kernel modules are imported at first call, so that
``import attnzoo`` needs neither triton nor flashinfer and Triton's interpreter switch
(``TRITON_INTERPRET=1``, read when a kernel is defined) can still be set by tests.
"""

from __future__ import annotations

import torch

from ..dispatch import Backend, register_backend
from ..selection import EXACT
from ._triton import interpreter_preference, tile, triton_missing, triton_reason

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.arange needs a power of two


def _tiles_ok(req) -> str | None:
    if req.block_size is not None and any(tile(b) is None for b in req.block_size):
        return f"block sizes {req.block_size} must be multiples of 16"
    return None


def _block_sparse_triton(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    from .triton_attention import KernelPlan, attention
    return attention(q, k, v, KernelPlan.from_block_plan(plan), key_padding_mask, scale)


def _mixed_triton(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    from .triton_attention import KernelPlan, attention
    return attention(q, k, v, KernelPlan.from_mixed_plan(plan), key_padding_mask, scale)


_TRITON = dict(devices=("cuda", "cpu"), dtypes=_FLOATS, backward=True, lse=True, head_dims=_HEAD_DIMS,
               available=triton_missing, device_check=triton_reason, check=_tiles_ok,
               prefer=interpreter_preference)

register_backend(Backend(
    op="block_sparse", name="triton", fn=_block_sparse_triton, plan_kinds=("block",),
    description="Triton flash attention over the plan's blocks; fp32 online softmax, fwd+bwd", **_TRITON))


def _block_sparse_grouped(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    from .triton_grouped import forward
    return forward(q, k, v, plan, key_padding_mask, scale)


def _group_shared(req) -> str | None:
    if req.q_len == 1:
        return "a decode step (one query per head): triton_decode splits its keys instead"
    if req.plan_heads != req.kv_heads or req.kv_heads == req.q_heads:
        return (f"serves plans shared by each GQA group only (plan heads = KV heads < query heads), got "
                f"{req.plan_heads} plan / {req.kv_heads} KV / {req.q_heads} query heads")
    if req.block_size is None:
        return "a block_sparse request names its plan's block sizes (make_request(..., block_size=))"
    bq, bk = req.block_size
    if bq & (bq - 1) or bk & (bk - 1) or not 16 <= bk <= 128:
        return f"block sizes ({bq}, {bk}) must be powers of two, the key block 16-128"
    if (req.q_heads // req.kv_heads) * bq > 128:
        return f"the group's query rows ({req.q_heads // req.kv_heads} heads x block_q {bq}) exceed a 128-row tile"
    return None


# before triton for the plans it serves: one program per (KV head, query block) walks the group's
# shared blocks once, where triton runs a program per query head
register_backend(Backend(
    op="block_sparse", name="triton_grouped", fn=_block_sparse_grouped, plan_kinds=("block",),
    description="Triton: a GQA group's query heads stacked in one tile over its shared blocks (forward only)",
    **{**_TRITON, "backward": False, "check": _group_shared}))


def _block_sparse_decode(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    from .triton_decode import decode
    return decode(q, k, v, plan.kv_indices, plan.kv_counts, plan.block_k, key_padding_mask, scale)


def _decode_only(req) -> str | None:
    if req.q_len != 1:
        return f"decode only (one query per head), got {req.q_len} queries"
    if req.block_size is not None and tile(req.block_size[1]) is None:
        return f"key block size {req.block_size[1]} must be a multiple of 16"
    return None


# first for block_sparse: a decode step's few rows split over many programs; prefill shapes decline
register_backend(Backend(
    op="block_sparse", name="triton_decode", fn=_block_sparse_decode, plan_kinds=("block",),
    description="Triton split-K decode: one query per head, the plan's key blocks shared out over programs, "
                "then merged", **{**_TRITON, "backward": False, "check": _decode_only}))


def _dense_triton(q, k, v, *, causal, key_padding_mask, scale, return_lse, row_lengths=None):
    from .triton_attention import KernelPlan, attention
    B, Hq = q.shape[:2]
    if row_lengths is not None:  # per query head, as the dense walk's plan heads
        row_lengths = row_lengths.repeat_interleave(Hq // row_lengths.shape[1], dim=1)
    return attention(q, k, v, KernelPlan.dense(B, Hq, q.shape[2], causal, q.device, row_lengths),
                     key_padding_mask, scale)


def _rows_only(req) -> str | None:
    if not req.row_lengths:
        return "serves calls naming row_lengths (Token Sparse's padded compressed tensors) only"
    return None


# before sdpa_cuda for the calls it serves: the rows past each head's length (padded slots of a
# static-width Token Sparse compression) are skipped on the device, where SDPA would attend over them
register_backend(Backend(
    op="dense", name="triton_rows", fn=_dense_triton, plan_kinds=("dense",), row_lengths=True,
    description="Triton flash attention skipping each head's rows past row_lengths (forward only)",
    **{**_TRITON, "backward": False, "check": _rows_only}))


# after sdpa_cuda and flashinfer: it serves what they decline (lse, padding, bottom-right causal
# with 1 < Nq < Nk), at FA2-class speed
register_backend(Backend(
    op="dense", name="triton", fn=_dense_triton, plan_kinds=("dense",),
    description="Triton flash attention, every head dense: lse, padding, any Nq <= Nk, fwd+bwd", **_TRITON))

register_backend(Backend(
    op="mixed", name="triton", fn=_mixed_triton, plan_kinds=("mixed",),
    description="Triton: dense / streaming / block-sparse heads in one launch, fwd+bwd", **_TRITON))


def _scores_triton(q, k, **kw):
    from .triton_scores import block_scores
    return block_scores(q, k, **kw)


def _scores_limits(req) -> str | None:
    if req.block_size is None or req.stride is None:
        return "a scoring request names its block size and stride (make_request(..., block_size=, stride=))"
    block, stride = req.block_size[0], req.stride
    r = block // stride
    if r & (r - 1) or stride & (stride - 1):
        return f"stride ({stride}) and block_size / stride ({r}) must be powers of two (tile shapes)"
    return None


def _selection_backend(op: str, fn, check, description: str, **overrides) -> None:
    """The scoring / selection ops: Triton kernels that feed a discrete choice (no backward, no lse),
    tried before the op's torch backend."""
    register_backend(Backend(op=op, name="triton", fn=fn, plan_kinds=("scores",), description=description,
                             **{**_TRITON, "backward": False, "lse": False, "check": check, **overrides}))


def _pooled_triton(q, k, **kw):
    from .triton_pooled import pooled_scores
    return pooled_scores(q, k, **kw)


def _pooled_limits(req) -> str | None:
    if req.block_size[0] % 16:
        return f"block size {req.block_size[0]} must be a multiple of 16 (tensor-core tiles)"
    return None


def _select_triton(rule, scores, **kw):
    from .triton_select import select
    return select(rule, scores, **kw)


def _select_limits(req) -> str | None:
    if req.dtype == torch.float64:
        return "fp64 scores (exact comparisons) stay in torch"
    return None


_selection_backend("antidiagonal_scores", _scores_triton, _scores_limits,
                   "Triton XAttention scoring: antidiagonal scores (or a cuBLAS reduced product where S*D is wide), "
                   "online softmax, block sums in one pass")
_selection_backend("pooled_scores", _pooled_triton, _pooled_limits,
                   "Triton top-k block scores: q . pooled keys, softmax and block sums in one launch")
_selection_backend("block_select", _select_triton, _select_limits,
                   "one Triton program per row, no sort: the cut by a binary search over score bits, index list",
                   dtypes=(torch.float32, torch.float64), head_dims=None, tolerances=EXACT)

def _pages_triton(q, lo, hi, **kw):
    from .triton_pages import page_scores
    return page_scores(q, lo, hi, **kw)


def _pages_limits(req) -> str | None:
    if req.q_heads // max(req.kv_heads, 1) > 64:
        return f"query group of {req.q_heads // req.kv_heads} heads > 64 (register tiles)"
    return None


_selection_backend("page_scores", _pages_triton, _pages_limits,
                   "Triton Quest page bounds: the last page's bounds updated, every page scored for the query "
                   "group in one launch")


def _router_triton(keys, weights, **kw):
    from .triton_router import router_logits
    return router_logits(keys, weights, **kw)


def _router_limits(req) -> str | None:
    if req.head_dim > 128:
        return f"head dim {req.head_dim} > 128 (register tiles)"
    return None


register_backend(Backend(
    op="head_router", name="triton", fn=_router_triton, plan_kinds=("head",),
    description="Triton: pooling, both MLPs and the logits of every KV head of a layer in one launch",
    **{**_TRITON, "backward": False, "lse": False, "padding": False, "check": _router_limits}))

# dispatch.PRIORITY puts Triton before FlashInfer for block-sparse calls both fit (Triton also takes
# padding, per-query-head plans and backward)
from . import flashinfer_backends  # noqa: E402,F401
