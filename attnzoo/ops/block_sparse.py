"""Block-sparse attention driven by a ``BlockPlan``.

Backends here (the Triton and FlashInfer kernels register from ``attnzoo.ops.kernels``):

- ``blocked``: portable torch. Query blocks are processed in chunks; for each chunk only the
  selected key blocks are gathered (per plan head, straight from the KV head that serves it,
  so K/V are never repeated to Hq heads), scores are computed for those blocks only, and the
  output and lse are written. Backward is a flash-style recomputation from (q, k, v, out, lse)
  chunk by chunk, so saved state is O(N), not O(computed pairs).
- ``flex``: ``torch.compile(flex_attention)`` with a BlockMask built straight from the plan's
  indices. On CPU PyTorch supports it for inference only and without lse; dispatch says so.
"""

from __future__ import annotations

import functools
import os
import shutil

import torch

from ..plans import BlockPlan
from ..plans.geometry import cdiv
from ..settings import value_checks
from ._checks import check_qkv, default_scale
from .dispatch import Backend, choose, make_request, register_backend

# Upper bound on score elements materialised per chunk (fp32): bounds memory, keeps GEMMs big.
CHUNK_ELEMENTS = 1 << 23


class _Layout:
    """Index bookkeeping shared by forward and backward for one (q, k, plan) triple."""

    def __init__(self, q_shape, k_shape, plan: BlockPlan, device):
        B, Hq, Nq, D = q_shape
        Hkv, Nk = k_shape[1], k_shape[2]
        self.B, self.Hq, self.Nq, self.D, self.Hkv, self.Nk = B, Hq, Nq, D, Hkv, Nk
        self.Hp = plan.heads  # plan heads: Hq or Hkv
        self.r = Hq // self.Hp  # query heads served by one plan head
        self.bq, self.bk = plan.block_q, plan.block_k
        self.Nqb = plan.num_q_blocks
        self.offset = plan.offset
        self.causal = plan.causal
        self.indices = plan.kv_indices
        self.counts = plan.kv_counts
        self.kv_head = (torch.arange(self.Hp, device=device) // (self.Hp // Hkv))[None, :, None, None]
        self.bidx = torch.arange(B, device=device)[:, None, None, None]
        self.device = device

    def chunks(self):
        """Yield (c0, c1, kmax) ranges of query blocks sized to CHUNK_ELEMENTS."""
        per_row = self.B * self.Hp * self.r * self.bq * self.bk  # score elements per (block, slot)
        counts_max = self.counts.amax(dim=(0, 1)).tolist()  # per query block
        c0 = 0
        while c0 < self.Nqb:
            c1, kmax = c0, 0
            while c1 < self.Nqb:
                k_new = max(kmax, int(counts_max[c1]))
                if c1 > c0 and (c1 - c0 + 1) * max(k_new, 1) * per_row > CHUNK_ELEMENTS:
                    break
                kmax, c1 = k_new, c1 + 1
            yield c0, c1, kmax
            c0 = c1

    def keys(self, c0, c1, kmax, key_padding_mask):
        """Selected blocks ``[B, Hp, C, kmax]`` and token positions ``[B, Hp, C, L]`` of their keys,
        with unusable keys (empty slot, past Nk, padding) moved to position ``BIG`` so that one
        comparison against the query position masks both them and the causal future."""
        blk = self.indices[:, :, c0:c1, :kmax].long()
        slot_ok = torch.arange(kmax, device=self.device) < self.counts[:, :, c0:c1, None]
        blk = torch.where(slot_ok, blk, 0)
        tok = (blk[..., None] * self.bk + torch.arange(self.bk, device=self.device)).flatten(-2)
        ok = slot_ok.repeat_interleave(self.bk, dim=-1) & (tok < self.Nk)
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[self.bidx, tok.clamp(max=self.Nk - 1)]
            first = 0
        else:
            first = self._first_masked_slot(c0, c1, blk, slot_ok)
        return blk, torch.where(ok, tok, self.BIG), first

    def _first_masked_slot(self, c0, c1, blk, slot_ok) -> int:
        """Smallest slot in the chunk whose block is not entirely visible to every row of its
        query block (empty slot, partial last block, or crossing the causal diagonal). Slots
        before it need no mask: indices are ascending, so masking is confined to the tail."""
        first_row = torch.arange(c0, c1, device=self.device)[:, None] * self.bq + self.offset
        end = (blk + 1) * self.bk  # one past the block's last key
        needs = ~slot_ok | (end > self.Nk)
        if self.causal:
            needs = needs | (end - 1 > first_row)
        if not bool(needs.any()):
            return blk.shape[-1]
        first = torch.where(needs, torch.arange(blk.shape[-1], device=self.device), blk.shape[-1])
        return int(first.amin())

    BIG = 1 << 40

    def masked(self, c0, c1, tok_eff):
        """Bool ``[B, Hp, C, r*bq, L]``: True where the key must be excluded."""
        rows = torch.arange(self.r * self.bq, device=self.device) % self.bq
        qpos = torch.arange(c0, c1, device=self.device)[:, None] * self.bq + rows + self.offset
        if not self.causal:
            qpos = torch.full_like(qpos, self.BIG - 1)
        return tok_eff[:, :, :, None, :] > qpos[None, None, :, :, None]

    def gather(self, x_blocks, blk):
        """Key blocks of ``x_blocks`` ``[B, Hkv, Nkb, bk, D]`` for each plan head: ``[B, Hp, C, L, D]``.

        Indexes the KV head serving each plan head directly: K/V are never repeated to Hq."""
        g = x_blocks[self.bidx, self.kv_head, blk]  # [B, Hp, C, kmax, bk, D]
        return g.flatten(3, 4)

    def kv_blocks(self, x):
        """``[B, Hkv, Nk, D]`` -> ``[B, Hkv, Nkb, bk, D]`` (one O(N) pad when Nk % bk != 0)."""
        nkb = cdiv(self.Nk, self.bk)
        pad = nkb * self.bk - self.Nk
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(x.shape[0], x.shape[1], nkb, self.bk, x.shape[3])

    def q_rows(self, x, c0, c1):
        """``[B, Hq, Nq_pad, ...]`` -> ``[B, Hp, C, r*bq, ...]`` for query blocks [c0, c1)."""
        sl = x[:, :, c0 * self.bq: c1 * self.bq]
        C = c1 - c0
        sl = sl.reshape(self.B, self.Hp, self.r, C, self.bq, *x.shape[3:])
        return sl.transpose(2, 3).reshape(self.B, self.Hp, C, self.r * self.bq, *x.shape[3:])

    def put_rows(self, dst, val, c0, c1):
        """Inverse of ``q_rows``: write ``val`` into ``dst[:, :, c0*bq:c1*bq]``."""
        C = c1 - c0
        tail = val.shape[4:]
        val = val.reshape(self.B, self.Hp, C, self.r, self.bq, *tail).transpose(2, 3)
        dst[:, :, c0 * self.bq: c1 * self.bq] = val.reshape(self.B, self.Hq, C * self.bq, *tail)

    def pad_q(self, x):
        pad = self.Nqb * self.bq - self.Nq
        if pad == 0:
            return x
        return torch.nn.functional.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad))


def _scores(qb, kg, scale, lay, c0, c1, tok, first_slot):
    s = torch.matmul(qb, kg.transpose(-1, -2)).mul_(scale)
    tail = first_slot * lay.bk
    if tail < s.shape[-1]:
        s[..., tail:].masked_fill_(lay.masked(c0, c1, tok[..., tail:]), float("-inf"))
    return s


def _probs_(s, lse):
    """In place: s -> exp(s - lse), with rows whose lse is -inf left as zeros."""
    return s.sub_(torch.where(torch.isinf(lse), 0.0, lse)[..., None]).exp_()


def _forward(q, k, v, lay: _Layout, key_padding_mask, scale):
    qp = lay.pad_q(q)
    kb, vb = lay.kv_blocks(k), lay.kv_blocks(v)
    out = torch.zeros(lay.B, lay.Hq, lay.Nqb * lay.bq, lay.D, dtype=torch.float32, device=q.device)
    lse = torch.full((lay.B, lay.Hq, lay.Nqb * lay.bq), float("-inf"), device=q.device)
    for c0, c1, kmax in lay.chunks():
        if kmax == 0:
            continue
        blk, tok, first = lay.keys(c0, c1, kmax, key_padding_mask)
        qb = lay.q_rows(qp, c0, c1).float()
        s = _scores(qb, lay.gather(kb, blk).float(), scale, lay, c0, c1, tok, first)
        # one exp per score: e = exp(s - rowmax); normalise the (few) output rows afterwards
        m = s.amax(-1)
        m = torch.where(torch.isinf(m), 0.0, m)
        e = s.sub_(m[..., None]).exp_()
        z = e.sum(-1)
        o_c = torch.matmul(e, lay.gather(vb, blk).float())
        o_c = o_c.div_(torch.where(z > 0, z, 1.0)[..., None])
        l_c = torch.where(z > 0, m + torch.log(z), float("-inf"))
        lay.put_rows(out, o_c, c0, c1)
        lay.put_rows(lse, l_c, c0, c1)
    return out[:, :, : lay.Nq].to(q.dtype), lse[:, :, : lay.Nq]


def _backward(q, k, v, out, lse, dout, dlse, lay: _Layout, key_padding_mask, scale):
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
    for c0, c1, kmax in lay.chunks():
        if kmax == 0:
            continue
        blk, tok, first = lay.keys(c0, c1, kmax, key_padding_mask)
        qb = lay.q_rows(qp, c0, c1).float()
        kg, vg = lay.gather(kb, blk).float(), lay.gather(vb, blk).float()
        p = _probs_(_scores(qb, kg, scale, lay, c0, c1, tok, first), lay.q_rows(lsep, c0, c1))
        do_c = lay.q_rows(dop, c0, c1)
        dp = torch.matmul(do_c, vg.transpose(-1, -2))
        ds = dp.sub_(lay.q_rows(delta, c0, c1)[..., None]).mul_(p).mul_(scale)
        lay.put_rows(dq, torch.matmul(ds, kg), c0, c1)
        # the same key block can be gathered for several query blocks and plan heads: accumulate
        where = (lay.bidx.expand_as(blk), lay.kv_head.expand_as(blk), blk)
        shape = (*blk.shape, lay.bk, lay.D)
        dkb.index_put_(where, torch.matmul(ds.transpose(-1, -2), qb).view(shape), accumulate=True)
        dvb.index_put_(where, torch.matmul(p.transpose(-1, -2), do_c).view(shape), accumulate=True)
    dk = dkb.flatten(2, 3)[:, :, : lay.Nk]
    dv = dvb.flatten(2, 3)[:, :, : lay.Nk]
    return dq[:, :, : lay.Nq].to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay, key_padding_mask, scale):
        out, lse = _forward(q, k, v, lay, key_padding_mask, scale)
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


def _blocked(q, k, v, plan, *, key_padding_mask, scale, return_lse):
    lay = _Layout(q.shape, k.shape, plan, q.device)
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
        return _blocked(q, k, v, plan, key_padding_mask=key_padding_mask, scale=scale, return_lse=return_lse)
    return out, None


def _flex_unavailable_now() -> str | None:
    reason = _flex_unavailable()
    if reason is None and _FLEX_FAILED:
        reason = f"torch.compile(flex_attention) failed earlier in this process ({_FLEX_FAILED[0]})"
    return reason


# Where compiled flex beats the blocked backend on CPU, from bench/test_ops_bench.py on the 2-core
# development machine (four runs, bench/results/cpu-ops.md): below ~4K keys the one-off compile
# (~10 s per process) is not amortised; above 8K keys and above density ~0.3 blocked was faster.
FLEX_MAX_LEN = 8192
FLEX_MAX_DENSITY = 0.3


def flex_min_len() -> int:
    return int(os.environ.get("ATTNZOO_FLEX_MIN_LEN", "4096"))


def _flex_preference(req):
    if req.kv_len < flex_min_len():
        return f"kv_len {req.kv_len} < {flex_min_len()}: compile cost not amortised (ATTNZOO_FLEX_MIN_LEN)"
    if req.kv_len > FLEX_MAX_LEN:
        return f"kv_len {req.kv_len} > {FLEX_MAX_LEN}: blocked measured faster on CPU"
    if req.plan_density is not None and req.plan_density > FLEX_MAX_DENSITY:
        return f"plan density {req.plan_density:.2f} > {FLEX_MAX_DENSITY}: blocked measured faster on CPU"
    return None


FLEX = register_backend(Backend(
    op="block_sparse", name="flex", fn=_flex, devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16), plan_kinds=("block",), backward=False, lse=False,
    padding=False,  # a captured mask tensor would be baked into the compiled graph
    available=_flex_unavailable_now, prefer=_flex_preference,
    description="torch.compile(flex_attention) with a BlockMask from the plan (CPU: inference)"))


# last in dispatch.PRIORITY: flex only fits large inference calls; blocked takes everything else
BLOCKED = register_backend(Backend(
    op="block_sparse", name="blocked", fn=_blocked, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), plan_kinds=("block",),
    backward=True, lse=True,
    description="torch gather of selected key blocks, fp32 math, recompute backward"))


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
                       # only the CPU's flex preference reads it; elsewhere it would cost a host sync
                       plan_density=plan.density() if value_checks(q.device) else None,
                       block_size=(plan.block_q, plan.block_k))
    impl = choose(req, backend)
    out, lse = impl.fn(q, k, v, plan, key_padding_mask=key_padding_mask,
                       scale=default_scale(q, scale), return_lse=return_lse)
    return (out, lse) if return_lse else out
