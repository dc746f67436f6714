"""Block-sparse attention driven by a ``BlockPlan``.

Backends here (the Triton and FlashInfer kernels register from ``attnzoo.ops.kernels``):

- ``blocked``: portable torch. Rows of (batch element, plan head, query block) are processed in
  chunks (``ops.block_layout``); for each chunk only the selected key blocks are gathered (per
  plan head, straight from the KV head that serves it, so K/V are never repeated to Hq), and
  attention runs over those blocks only: on a CPU through aten's fused flash kernel (scores never
  materialised), elsewhere as fp32 torch math. Backward is a flash-style recomputation from
  (q, k, v, out, lse) chunk by chunk, so saved state is O(N), not O(computed pairs).
- ``flex``: ``torch.compile(flex_attention)`` with a BlockMask built straight from the plan's
  indices. On CPU PyTorch supports it for inference only and without lse; dispatch says so.
"""

from __future__ import annotations

import functools
import shutil

import torch

from .. import settings
from ..plans import BlockPlan
from ._checks import check_qkv, default_scale
from .block_layout import BlockLayout
from .dispatch import Backend, choose, make_request, register_backend
from .merge import merge_attention


def _scores(qb, kg, scale, lay, rows, tok, first_slot):
    s = torch.matmul(qb, kg.transpose(-1, -2)).mul_(scale)
    tail = first_slot * lay.bk
    if tail < s.shape[-1]:
        s[..., tail:].masked_fill_(lay.masked(rows, tok[..., tail:]), float("-inf"))
    return s


def _probs_(s, lse):
    """In place: s -> exp(s - lse), with rows whose lse is -inf left as zeros."""
    return s.sub_(torch.where(torch.isinf(lse), 0.0, lse)[..., None]).exp_()


def _rows_forward(q, k, v, lay: BlockLayout, key_padding_mask, scale, attend, out_dtype):
    """The frame both forwards share: pad q, view K/V as blocks, walk the layout's chunks and write
    each chunk's ``attend(qp, kb, vb, lay, rows, kmax, key_padding_mask, scale) -> (out, lse)``."""
    qp = lay.pad_q(q)
    kb, vb = lay.kv_blocks(k), lay.kv_blocks(v)
    out = torch.zeros(lay.B, lay.Hq, lay.Nqb * lay.bq, lay.D, dtype=out_dtype, device=q.device)
    lse = torch.full((lay.B, lay.Hq, lay.Nqb * lay.bq), float("-inf"), device=q.device)
    for rows, kmax in lay.chunks():
        if kmax == 0:
            continue
        o_c, l_c = attend(qp, kb, vb, lay, rows, kmax, key_padding_mask, scale)
        lay.put_rows(out, o_c, rows)
        lay.put_rows(lse, l_c, rows)
    return out[:, :, : lay.Nq].to(q.dtype), lse[:, :, : lay.Nq]


def _attend_fp32(qp, kb, vb, lay: BlockLayout, rows, kmax, key_padding_mask, scale):
    blk, tok, first = lay.keys(rows, kmax, key_padding_mask)
    qb = lay.q_rows(qp, rows).float()
    s = _scores(qb, lay.gather(kb, rows, blk).float(), scale, lay, rows, tok, first)
    # one exp per score: e = exp(s - rowmax); normalise the (few) output rows afterwards
    m = s.amax(-1)
    m = torch.where(torch.isinf(m), 0.0, m)
    e = s.sub_(m[..., None]).exp_()
    z = e.sum(-1)
    o_c = torch.matmul(e, lay.gather(vb, rows, blk).float())
    o_c = o_c.div_(torch.where(z > 0, z, 1.0)[..., None])
    return o_c, torch.where(z > 0, m + torch.log(z), float("-inf"))


def _forward(q, k, v, lay: BlockLayout, key_padding_mask, scale):
    """The forward as fp32 torch math over materialised scores of the gathered blocks (CUDA)."""
    return _rows_forward(q, k, v, lay, key_padding_mask, scale, _attend_fp32, torch.float32)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_part(qb, kg, vg, allow, scale):
    """aten's fused CPU flash kernel over one chunk's gathered keys: ``qb`` ``[C, M, D]``, ``kg``/
    ``vg`` ``[C, L, D]``, ``allow`` ``None`` or bool broadcastable to ``[C, M, L]``. Returns out
    ``[C, M, D]`` and lse ``[C, M]`` (fp32; -inf where a query saw no key: the kernel says 0)."""
    bias = None
    if allow is not None:
        bias = torch.zeros((), dtype=qb.dtype, device=qb.device).masked_fill(~allow, float("-inf"))[:, None]
    o, lse = _FLASH_CPU(qb[:, None], kg[:, None], vg[:, None], 0.0, False, attn_mask=bias, scale=scale)
    o, lse = o[:, 0], lse[:, 0]
    if allow is not None:
        lse = lse.masked_fill(~allow.any(-1).expand(lse.shape), float("-inf"))
    return o, lse


def _flash_diagonal(qb, kg, vg, r: int, scale):
    """Each row's own diagonal block through the kernel's ``is_causal`` (no mask to build or read,
    and the upper triangle skipped: half the time of the masked call on the 2-core CPU): ``qb``
    ``[C, r*bq, D]`` holds r query heads' copies of the block, which become r heads against the
    one key block (expanded, not copied)."""
    C, M, D = qb.shape
    q4 = qb.view(C, r, M // r, D)
    o, lse = _FLASH_CPU(q4, kg[:, None].expand(C, r, *kg.shape[1:]), vg[:, None].expand(C, r, *vg.shape[1:]),
                        0.0, True, scale=scale)
    return o.reshape(C, M, D), lse.reshape(C, M)


def _attend_flash_cpu(qp, kb, vb, lay: BlockLayout, rows, kmax, key_padding_mask, scale):
    (open_blk, open_ok), (edge_blk, edge_tok) = lay.open_and_edge(rows, kmax, key_padding_mask)
    qb = lay.q_rows(qp, rows)
    parts = []
    if open_blk.shape[1]:
        allow = None if bool(open_ok.all()) else open_ok[:, None, :]
        parts.append(_flash_part(qb, lay.gather(kb, rows, open_blk), lay.gather(vb, rows, open_blk), allow, scale))
    if edge_blk.shape[1]:
        kg, vg = lay.gather(kb, rows, edge_blk), lay.gather(vb, rows, edge_blk)
        if lay.diagonal_edges(rows, edge_blk, edge_tok, key_padding_mask):
            parts.append(_flash_diagonal(qb, kg, vg, lay.r, scale))
        else:
            parts.append(_flash_part(qb, kg, vg, ~lay.masked(rows, edge_tok), scale))
    return parts[0] if len(parts) == 1 else merge_attention(*parts[0], *parts[1])


def _forward_flash_cpu(q, k, v, lay: BlockLayout, key_padding_mask, scale):
    """The forward on a CPU through aten's fused flash kernel, chunk by chunk over gathered key
    blocks, in the input dtype (the kernel accumulates in fp32), never materialising scores. The
    kernel takes an additive mask, which it reads at full size: a per-(query, key) mask over all
    of a chunk's keys cost as much as the kernel itself. So each row's *open* slots (every query
    may see every key) take a per-key mask broadcast over queries, or none, and only its *edge*
    slots (crossing the causal diagonal: one or two blocks) a full one; the two parts merge by lse.
    Where every row's edge is its own whole diagonal block (square aligned blocks, no padding
    mask: what the selectors' plans give in a prefill), the edge runs with ``is_causal`` and no
    mask (SmolLM2 layers at 3K tokens, XAttention plans at density 0.34 / 0.25 / 0.14: 118 / 92 /
    64 ms against 119 / 100 / 72 with the mask; dense SDPA 134 / 117 / 119 ms, same process).
    Same outputs as ``_forward`` to rounding (tests/test_ops_backends.py). Op-level times:
    16K, density 0.1: 0.58 s, where fp32 scores and an element-wise gather took 0.87 s and dense
    2.5 s (``bench/test_ops_bench.py``). The kernel is least efficient with few
    queries per row: 64 (block 64, plan per query head) ran at ~74 GFLOP/s, 128 or more at
    116-131, dense causal SDPA at ~116."""
    return _rows_forward(q, k, v, lay, key_padding_mask, scale, _attend_flash_cpu, q.dtype)


def _backward(q, k, v, out, lse, dout, dlse, lay: BlockLayout, key_padding_mask, scale):
    qp = lay.pad_q(q)
    dop = lay.pad_q(dout.float())
    lsep = lay.pad_q(lse)
    delta = lay.pad_q((dout.float() * out.float()).sum(-1))  # rowsum(dO * O)
    if dlse is not None:
        delta = delta - lay.pad_q(dlse.float())
    kb, vb = lay.kv_blocks(k), lay.kv_blocks(v)
    dq = torch.zeros(lay.B, lay.Hq, lay.Nqb * lay.bq, lay.D, dtype=torch.float32, device=q.device)
    dkb = torch.zeros(kb.shape, dtype=torch.float32, device=k.device)
    dvb = torch.zeros(vb.shape, dtype=torch.float32, device=v.device)
    for rows, kmax in lay.chunks():
        if kmax == 0:
            continue
        blk, tok, first = lay.keys(rows, kmax, key_padding_mask)
        qb = lay.q_rows(qp, rows).float()
        kg, vg = lay.gather(kb, rows, blk).float(), lay.gather(vb, rows, blk).float()
        p = _probs_(_scores(qb, kg, scale, lay, rows, tok, first), lay.q_rows(lsep, rows))
        do_c = lay.q_rows(dop, rows)
        dp = torch.matmul(do_c, vg.transpose(-1, -2))
        ds = dp.sub_(lay.q_rows(delta, rows)[..., None]).mul_(p).mul_(scale)
        lay.put_rows(dq, torch.matmul(ds, kg), rows)
        # the same key block can be gathered for several query blocks and plan heads: accumulate
        b, _, kvh, _ = lay.split(rows)
        where = (b[:, None].expand_as(blk), kvh[:, None].expand_as(blk), blk)
        shape = (*blk.shape, lay.bk, lay.D)
        dkb.index_put_(where, torch.matmul(ds.transpose(-1, -2), qb).view(shape), accumulate=True)
        dvb.index_put_(where, torch.matmul(p.transpose(-1, -2), do_c).view(shape), accumulate=True)
    dk = dkb.flatten(2, 3)[:, :, : lay.Nk]
    dv = dvb.flatten(2, 3)[:, :, : lay.Nk]
    return dq[:, :, : lay.Nq].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay, key_padding_mask, scale):
        fwd = _forward_flash_cpu if q.device.type == "cpu" else _forward
        out, lse = fwd(q, k, v, lay, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lay, ctx.kpm, ctx.scale = lay, key_padding_mask, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.lay, ctx.kpm, ctx.scale)
        return dq, dk, dv, None, None, None


def blocked_attention(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    """The ``blocked`` backend's function (also dense's portable fallback, over a full plan)."""
    lay = BlockLayout(q.shape, k.shape, plan, q.device)
    return _BlockedAttention.apply(q, k, v, lay, key_padding_mask, scale)


# -- FlexAttention (compiled) -------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _flex_unavailable() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the torch build
        return f"torch has no flex_attention ({e})"
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile needs a C++ compiler on PATH"
    return None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    # fullgraph: a recompile past dynamo's limit (or any graph break) raises instead of silently
    # running eager flex, which would ignore the BlockMask's index lists (see to_flex_block_mask)
    return torch.compile(flex_attention, dynamic=True, fullgraph=True)


_FLEX_FAILED: list[str] = []  # why compiled flex stopped working in this process, if it did


def to_flex_block_mask(plan: BlockPlan, q_heads: int, key_padding_mask=None, selection_in_mask_mod: bool = True):
    """A FlexAttention ``BlockMask`` from the plan's indices (no token-level N x N mask is built).

    The compiled flex kernel walks the BlockMask's index lists, so unselected blocks cost nothing.
    Eager flex evaluates only ``mask_mod`` over every pair: with ``selection_in_mask_mod`` (the
    default) ``mask_mod`` also looks the block up in a block-level ``[B, H, Nqb, Nkb]`` table, so
    the mask is right under eager flex too. The ``flex`` backend passes False because inductor's CPU
    flex template cannot compile that lookup with dynamic shapes; it compiles with
    ``fullgraph=True`` instead, so it can never run eagerly (see ``_flex``).
    """
    from torch.nn.attention.flex_attention import BlockMask

    idx, cnt = plan.kv_indices, plan.kv_counts
    group = q_heads // plan.heads
    if group != 1:  # per-KV-head plan: flex wants one row per query head
        idx = idx.repeat_interleave(group, dim=1)
        cnt = cnt.repeat_interleave(group, dim=1)
    offset, causal, bq, bk = plan.offset, plan.causal, plan.block_q, plan.block_k
    selected = plan.to_block_mask() if selection_in_mask_mod else None  # block level: (N/b)^2

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx >= 0
        if selected is not None:
            ok = ok & selected[b, h // group, q_idx // bq, kv_idx // bk]
        if causal:
            ok = ok & (kv_idx <= q_idx + offset)
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[b, kv_idx]
        return ok

    # flex reads the index tensor's width as the number of key blocks
    idx = torch.nn.functional.pad(idx.clamp(min=0), (0, plan.num_kv_blocks - idx.shape[-1]))
    return BlockMask.from_kv_blocks(cnt.int(), idx.int(),
                                    BLOCK_SIZE=(plan.block_q, plan.block_k), mask_mod=mask_mod,
                                    seq_lengths=(plan.q_len, plan.kv_len))


def _flex(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    mask = to_flex_block_mask(plan, q.shape[1], key_padding_mask, selection_in_mask_mod=False)
    try:
        out = _compiled_flex()(q, k, v, block_mask=mask, scale=scale,
                               enable_gqa=q.shape[1] != k.shape[1])
    except Exception as e:  # noqa: BLE001 - any compile failure: stop using flex, stay correct
        _FLEX_FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
        return blocked_attention(q, k, v, plan, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)
    return out, None


def _flex_unavailable_now() -> str | None:
    reason = _flex_unavailable()
    if reason is None and _FLEX_FAILED:
        reason = f"torch.compile(flex_attention) failed earlier in this process ({_FLEX_FAILED[0]})"
    return reason


# Compiled flex on CPU is opt-in (ATTNZOO_FLEX_MIN_LEN). On random plans it beat the blocked backend
# at 4K-6K keys and low density (bench/cpu_flex_vs_blocked.py),
# but on the plans the shipped selectors draw from the embedded model it did not pay: over all 30
# layers, flex preferred as below against blocked alone, same process (bench/cpu_attention_calls.py),
# XAttention-family plans ran within a few per cent either
# way at 4K and 6K keys and topk-blocks' 16-token blocks clearly slower, and the first call in a
# process compiles for 4-11 s: in `attnzoo compare` at 4K that lands inside one timed prefill.
# Opted in, flex is preferred between ATTNZOO_FLEX_MIN_LEN and FLEX_MAX_LEN keys where the random
# plans measured it faster: up to density 0.15 for any plan with 64-token blocks, and up to 0.35 for
# rows of at most 64 queries below 6,144 keys (blocked's CPU forward runs aten's flash kernel per
# row, slow with few queries).
FLEX_MAX_LEN = 8192
FLEX_MAX_DENSITY = 0.15  # any row size, up to FLEX_MAX_LEN keys
FLEX_SMALL_ROWS = 64  # rows of at most this many queries ...
FLEX_SMALL_ROWS_MAX_LEN = 6144  # ... up to this many keys ...
FLEX_SMALL_ROWS_MAX_DENSITY = 0.35  # ... take flex up to this density
FLEX_MIN_BLOCK = 64  # the random plans' block; 16-token blocks measured slower with flex


def flex_min_len() -> int | None:
    """``ATTNZOO_FLEX_MIN_LEN``: the fewest keys at which dispatch prefers compiled flex on a CPU;
    unset or empty, it never prefers it (``backend="flex"`` still forces it)."""
    return settings.get("flex_min_len")


def _flex_preference(req):
    min_len = flex_min_len()
    if min_len is None:
        return ("opt-in on CPU (ATTNZOO_FLEX_MIN_LEN=keys): not faster than blocked on the shipped "
                "selectors' plans, and its first call compiles for seconds")
    if req.kv_len < min_len:
        return f"kv_len {req.kv_len} < {min_len}: compile cost not amortised (ATTNZOO_FLEX_MIN_LEN)"
    if req.kv_len > FLEX_MAX_LEN:
        return f"kv_len {req.kv_len} > {FLEX_MAX_LEN}: blocked measured faster on CPU"
    if req.block_size is not None and min(req.block_size) < FLEX_MIN_BLOCK:
        return f"blocks of {req.block_size} < {FLEX_MIN_BLOCK} tokens: blocked measured faster on CPU"
    if req.plan_density is None:
        return None
    row = (req.q_heads // max(req.plan_heads, 1)) * (req.block_size[0] if req.block_size else 0)
    small = 0 < row <= FLEX_SMALL_ROWS and req.kv_len <= FLEX_SMALL_ROWS_MAX_LEN
    limit = FLEX_SMALL_ROWS_MAX_DENSITY if small else FLEX_MAX_DENSITY
    if req.plan_density > limit:
        return f"plan density {req.plan_density:.2f} > {limit} (rows of {row} queries): blocked measured faster on CPU"
    return None


def _flex_limits(req) -> str | None:
    # a capability, not a preference: forcing flex must not get past it. Compiled flex on CPU
    # (torch 2.13) returned wrong rows (errors up to 17 against the reference) whenever the keys
    # were shorter than one key block (kv_len 24, block_k 32); kv_len >= block_k was exact
    # (found by tests/fuzz/test_ops_fuzz.py; tests/test_regressions.py keeps the case)
    if req.block_size is not None and req.kv_len < req.block_size[1]:
        return f"kv_len {req.kv_len} < block_k {req.block_size[1]}: compiled flex miscomputes keys shorter than a block"
    # bf16 over one-key blocks: non-finite or ~1e37 rows (block_q 1-32, GQA, non-causal; the fuzz found
    # it; fp32 and block_k 2-8 were exact; tests/test_regressions.py keeps the case)
    if req.block_size is not None and req.block_size[1] == 1 and req.dtype != torch.float32:
        return "block_k 1 at 16-bit precision: compiled flex returned non-finite rows"
    return None


FLEX = register_backend(Backend(
    op="block_sparse", name="flex", fn=_flex, devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16), plan_kinds=("block",), backward=False, lse=False,
    padding=False,  # a captured mask tensor would be baked into the compiled graph
    available=_flex_unavailable_now, check=_flex_limits, prefer=_flex_preference,
    description="torch.compile(flex_attention) with a BlockMask from the plan (CPU: inference)"))


# last in dispatch.PRIORITY: flex only fits large inference calls; blocked takes everything else
BLOCKED = register_backend(Backend(
    op="block_sparse", name="blocked", fn=blocked_attention, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), plan_kinds=("block",),
    backward=True, lse=True,
    description="gathered key blocks: CPU aten flash kernel, else fp32 torch math; recompute backward"))


def block_sparse(q, k, v, plan: BlockPlan, *, key_padding_mask=None, scale=None,
                 return_lse: bool = False, backend: str | None = None):
    """Attention of q ``[B, Hq, Nq, D]`` over k/v ``[B, Hkv, Nk, D]`` restricted to ``plan``.

    Only the plan's key blocks are computed; the plan's causality (bottom-right) and
    ``key_padding_mask`` (``[B, Nk]``, True = real) apply inside them. Returns ``out`` or
    ``(out, lse)``; rows that see no key are zeros with lse = -inf.
    """
    if not isinstance(plan, BlockPlan):
        raise TypeError(f"plan must be a BlockPlan, got {type(plan).__name__}")
    check_qkv(q, k, v, causal=plan.causal, key_padding_mask=key_padding_mask, scale=scale)
    plan.validate(q, k)
    req = make_request("block_sparse", q, k, v, "block", return_lse=return_lse,
                       key_padding_mask=key_padding_mask, causal=plan.causal,
                       plan_heads=plan.heads,
                       # only the CPU's opted-in flex preference reads it (its density limits), so it is
                       # read exactly then, whatever ATTNZOO_CHECK_VALUES says; elsewhere a read is a sync
                       plan_density=plan.density() if q.device.type == "cpu" and flex_min_len() is not None
                       else None,
                       block_size=(plan.block_q, plan.block_k))
    impl = choose(req, backend)
    out, lse = impl.fn(q, k, v, plan, key_padding_mask=key_padding_mask,
                       scale=default_scale(q, scale), return_lse=return_lse)
    return (out, lse) if return_lse else out
