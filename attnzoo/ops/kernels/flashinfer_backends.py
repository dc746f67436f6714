"""FlashInfer backends (CUDA): dense prefill and per-KV-head variable block-sparse attention.

The plan -> FlashInfer conversion (``variable_block_calls``) is plain torch and tested on CPU;
only the kernels need a GPU.

FlashInfer's causal rule inside a block-sparse call is bottom-right over the *gathered* keys of
each (KV head, query block): row i of an R-row block sees gathered keys ``j <= i + L - R`` (L =
gathered length). That equals the plan's token rule exactly when blocks are square and aligned
to the diagonal (block_q == block_k, (Nk - Nq) % block_k == 0) and the diagonal block is the
last block gathered. When a row block does not select its diagonal block, the conversion
splits the call in two — off-diagonal blocks (fully visible, non-causal) and diagonal blocks
(causal) — and the results are merged by lse. Other geometries are declined by dispatch.

FlashInfer's lse is base 2; it is converted to natural log here.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

import torch

from ... import settings
from ...caches import shape_cache
from ...plans import BlockPlan
from ...plans.geometry import cdiv
from ..dispatch import Backend, register_backend
from ..merge import merge_attention

LN2 = math.log(2.0)
_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128, 256)


@functools.lru_cache(maxsize=1)
def flashinfer_missing() -> str | None:
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer is not installed (pip install 'attnzoo[gpu]')"
    return None


def _cuda_only(device: str) -> str | None:
    return None if device == "cuda" else "FlashInfer kernels run on CUDA only"


def kernel_backend() -> str:
    """FlashInfer's own backend: fa2 by default (fa3 JIT builds take far longer and need extra
    CUDA headers); ATTNZOO_FLASHINFER_BACKEND=auto lets FlashInfer pick fa3 on Hopper."""
    return settings.get("flashinfer_backend")


# -- dense --------------------------------------------------------------------------------------

def _dense(q, k, v, *, causal, key_padding_mask, scale, return_lse):
    import flashinfer

    outs, lses = [], []
    for b in range(q.shape[0]):
        o, lse = flashinfer.single_prefill_with_kv_cache(
            q[b].transpose(0, 1).contiguous(), k[b].contiguous(), v[b].contiguous(), causal=causal, kv_layout="HND",
            sm_scale=scale, return_lse=True, backend=kernel_backend())
        outs.append(o.transpose(0, 1))
        lses.append(lse.transpose(0, 1).float() * LN2)
    return torch.stack(outs), torch.stack(lses)


FLASHINFER_DENSE = register_backend(Backend(
    op="dense", name="flashinfer", fn=_dense, devices=("cuda",), dtypes=_DTYPES,
    plan_kinds=("dense",), backward=False, lse=True, head_dims=_HEAD_DIMS, padding=False,
    available=flashinfer_missing, device_check=_cuda_only,
    description="FlashInfer single_prefill_with_kv_cache (HND K/V, bottom-right causal, GQA)"))


# -- variable block-sparse -----------------------------------------------------------------------

@dataclass
class VariableBlockCall:
    """Arguments of one ``VariableBlockSparseAttentionWrapper.plan`` for one batch element."""

    block_mask_map: torch.Tensor  # [Hkv, MB, NB] bool
    block_row_sz: torch.Tensor  # [Hkv, MB] int32
    block_col_sz: torch.Tensor  # [Hkv, NB] int32
    causal: bool


def geometry_reason(plan_or_sizes) -> str | None:
    """Why FlashInfer's gathered-causal rule cannot express this plan exactly (None: it can)."""
    bq, bk, q_len, kv_len, causal = plan_or_sizes
    if causal and (bq != bk or (kv_len - q_len) % bk):
        return (f"FlashInfer applies causality over gathered blocks: exact only for square blocks "
                f"aligned to the diagonal (block_q == block_k and (Nk - Nq) % block_k == 0); got "
                f"block {bq}x{bk}, Nk - Nq = {kv_len - q_len}")
    return None


def _sizes(n: int, block: int, heads: int, device) -> torch.Tensor:
    nb = cdiv(n, block)
    sz = torch.full((heads, nb), block, dtype=torch.int32, device=device)
    sz[:, -1] = n - (nb - 1) * block
    return sz


def variable_block_calls(plan: BlockPlan, b: int) -> list[VariableBlockCall]:
    """Batch element ``b`` of a per-KV-head plan as one (or two, see module doc) FlashInfer calls
    whose union is exactly the plan's token-level pattern."""
    reason = geometry_reason((plan.block_q, plan.block_k, plan.q_len, plan.kv_len, plan.causal))
    if reason:
        raise ValueError(reason)
    bm = plan.to_block_mask()[b]  # [H, MB, NB]
    H, dev = bm.shape[0], bm.device
    rows = _sizes(plan.q_len, plan.block_q, H, dev)
    cols = _sizes(plan.kv_len, plan.block_k, H, dev)
    if not plan.causal:
        return [VariableBlockCall(bm, rows, cols, False)]
    diag = plan.last_visible_block()  # [MB]
    on_diag = torch.zeros_like(bm)
    on_diag[:, torch.arange(bm.shape[1], device=dev), diag] = True
    has_diag = (bm & on_diag).any(-1)
    if bool((has_diag | ~bm.any(-1)).all()):
        return [VariableBlockCall(bm, rows, cols, True)]
    return [VariableBlockCall(bm & ~on_diag, rows, cols, False),
            VariableBlockCall(bm & on_diag, rows, cols, True)]


@shape_cache(4)
def _wrapper(device: str):
    import flashinfer

    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    return flashinfer.VariableBlockSparseAttentionWrapper(workspace, backend=kernel_backend())


def _run_call(call: VariableBlockCall, q, k, v, scale):
    """One FlashInfer call for q ``[Hq, Nq, D]``, k/v ``[Hkv, Nk, D]``: (out, natural lse)."""
    w = _wrapper(str(q.device))
    w.plan(call.block_mask_map, call.block_row_sz, call.block_col_sz, q.shape[0], k.shape[0],
           q.shape[-1], causal=call.causal, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k.dtype)
    out, lse = w.run(q, k, v, return_lse=True)
    lse = lse.float() * LN2
    # rows with no gathered key: make them exact zeros / -inf whatever the kernel wrote
    empty = ~call.block_mask_map.any(-1)  # [Hkv, MB]
    if bool(empty.any()):
        g = q.shape[0] // k.shape[0]
        rows = empty.repeat_interleave(call.block_row_sz[0].long(), dim=1)[:, : q.shape[1]]
        rows = rows.repeat_interleave(g, dim=0)
        out = out.masked_fill(rows[..., None], 0)
        lse = lse.masked_fill(rows, float("-inf"))
    return out, lse


def _block_sparse(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    outs, lses = [], []
    for b in range(q.shape[0]):
        parts = [_run_call(c, q[b], k[b].contiguous(), v[b].contiguous(), scale)
                 for c in variable_block_calls(plan, b)]
        o, lse = parts[0]
        for o2, l2 in parts[1:]:
            o, lse = merge_attention(o, lse, o2, l2)
        outs.append(o.to(q.dtype))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _block_sparse_limits(req) -> str | None:
    if req.plan_heads != req.kv_heads:
        return (f"needs a per-KV-head plan (plan heads {req.plan_heads} != kv heads {req.kv_heads}; "
                f"e.g. xattention per_kv_head=True)")
    if req.block_size is not None:
        return geometry_reason((*req.block_size, req.q_len, req.kv_len, req.causal))
    return None


FLASHINFER_BLOCK_SPARSE = register_backend(Backend(
    op="block_sparse", name="flashinfer", fn=_block_sparse, devices=("cuda",), dtypes=_DTYPES,
    plan_kinds=("block",), backward=False, lse=True, head_dims=_HEAD_DIMS, padding=False,
    available=flashinfer_missing, device_check=_cuda_only, check=_block_sparse_limits,
    description="FlashInfer VariableBlockSparseAttentionWrapper (per-KV-head plans, inference)"))
