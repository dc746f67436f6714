"""Attention recall of a whole stack, per layer and head, at sampled query rows.

For a layer's node and the real q, k, v of a prefill, at ``R`` sampled query rows:

- **recall**: the share of full attention's softmax mass on the keys the node lets each row see
  (XAttention and FlexPrefill calibrate to >= 0.9 of it);
- **relative error**: ``||o_stack - o_full|| / ||o_full||`` of the attention output over the rows.

Which keys a row keeps is read from the node's own decisions (selector plans, router head plans,
token plans), walked through the node tree by ``keep_rows``; only ``R x N`` scores are formed —
never the ``N x N`` matrix. ``RecallProbe`` does this inside ``attnzoo.patch(..., probe=...)``,
so a stack is measured on exactly the tensors it sees in a real forward pass.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..ops import token_sparse
from ..plans import BlockPlan, DensePlan, TokenPlan
from ..stack import Branch, Compressed, Phased, Routed, dense_below_applies

ROWS = 64


def sample_rows(n: int, rows: int = ROWS, device=None) -> torch.Tensor:
    """``rows`` query positions spread evenly over ``[n // 8, n)``: the first eighth of a prompt
    attends to few keys, where every method is (nearly) dense."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lo = n // 8
    return torch.linspace(lo, n - 1, min(rows, n - lo), device=device).round().long().unique()


def _visible(q, k, rows, kpm) -> torch.Tensor:
    """bool ``[B, Hq, R, Nk]``: causal (bottom-right) and padding rule for ``rows`` ``[B, Hq, R]``."""
    Nq, Nk = q.shape[2], k.shape[2]
    keys = torch.arange(Nk, device=q.device)
    vis = keys <= (rows + (Nk - Nq))[..., None]
    if kpm is not None:
        vis = vis & kpm[:, None, None, :]
    return vis


def _per_query_head(x: torch.Tensor, hq: int) -> torch.Tensor:
    """A per-plan-head tensor ``[B, Hp, ...]`` as ``[B, Hq, ...]`` (a KV head's plan serves its group)."""
    return x if x.shape[1] == hq else x.repeat_interleave(hq // x.shape[1], dim=1)


def _block_rows(plan: BlockPlan, q, rows) -> torch.Tensor:
    """bool ``[B, Hq, R, Nk]``: the key blocks ``plan`` selects for each row's query block (the
    plan's own block mask, ``Nqb x Nkb``, read at the rows' query blocks)."""
    blocks = _per_query_head(plan.to_block_mask(), q.shape[1])  # [B, Hq, Nqb, Nkb]
    qb = (rows // plan.block_q)[..., None].expand(-1, -1, -1, blocks.shape[-1])
    return blocks.gather(2, qb).repeat_interleave(plan.block_k, -1)[..., : plan.kv_len]


def _token_rows(node_inner, plan: TokenPlan, q, k, ctx, rows) -> torch.Tensor:
    """A token plan: kept rows see what ``node_inner`` keeps among the kept keys (None: all of them)."""
    B, Hq, Nk = q.shape[0], q.shape[1], k.shape[2]
    idx = _per_query_head(plan.indices.long(), Hq)  # [B, Hq, N'] ascending, -1 past the length
    valid = _per_query_head(plan.valid(), Hq)
    keep = _per_query_head(plan.keep_mask(), Hq)  # [B, Hq, N]
    kept = keep.gather(-1, rows)  # [B, Hq, R]: the row itself is kept
    # a kept row's slot in the compressed sequence: kept positions before it (indices ascend)
    pos = (keep.cumsum(-1) - 1).gather(-1, rows).clamp(min=0)
    if node_inner is None:
        inner = torch.ones(*rows.shape, idx.shape[-1], dtype=torch.bool, device=q.device)
    else:
        qc, kc, _ = token_sparse.compress(q, k, k, plan, key_padding_mask=ctx.key_padding_mask)
        inner = keep_rows(node_inner, qc, kc, replace(ctx, key_padding_mask=None, pre_rope_keys=None), pos)
    inner = inner & valid[:, :, None, :] & kept[..., None]
    out = torch.zeros(B, Hq, rows.shape[-1], Nk + 1, dtype=torch.bool, device=q.device)
    out.scatter_(-1, torch.where(valid, idx, Nk)[:, :, None, :].expand_as(inner), inner)
    return out[..., :Nk]


def _plan_rows(plan, q, k, ctx, rows) -> torch.Tensor:
    if isinstance(plan, DensePlan):
        return torch.ones(*rows.shape, k.shape[2], dtype=torch.bool, device=q.device)
    if isinstance(plan, BlockPlan):
        return _block_rows(plan, q, rows)
    if isinstance(plan, TokenPlan):
        return _token_rows(None, plan, q, k, ctx, rows)
    raise TypeError(f"keep_rows cannot read a {type(plan).__name__}")


@torch.no_grad()
def keep_rows(node, q, k, ctx, rows) -> torch.Tensor:
    """bool ``[B, Hq, R, Nk]``: the keys ``node`` lets query rows ``rows`` (``[B, Hq, R]`` indices
    into q) attend to, with the causal and padding rules applied — its decisions as a layer call
    with this ``ctx`` makes them (dense crossovers included)."""
    vis = _visible(q, k, rows, ctx.key_padding_mask)
    if isinstance(node, Phased):  # the probe measures prefill calls
        return keep_rows(node.prefill, q, k, ctx, rows)
    if isinstance(node, Branch):
        if node.selector is None or dense_below_applies(node.dense_below, k):
            return vis
        return _plan_rows(node.selector(q, k, ctx), q, k, ctx, rows) & vis
    if isinstance(node, Routed):
        if dense_below_applies(node.dense_below, k):
            return vis
        heads = node.decide(q, k, replace(ctx, cache=None))  # the same decision, not stored again
        route = _per_query_head(heads.branch, q.shape[1])  # [B, Hq]
        out = torch.zeros_like(vis)
        for i, label in enumerate(node.labels):
            on = route == i
            if bool(on.any()):
                out |= keep_rows(node.branches[label], q, k, ctx, rows) & on[..., None, None]
        return out
    if isinstance(node, Compressed):
        if dense_below_applies(node.dense_below, k):
            return vis
        plan = node.compress(q, k, ctx)
        if isinstance(plan, DensePlan):
            return keep_rows(node.inner, q, k, ctx, rows)
        return _token_rows(node.inner, plan, q, k, ctx, rows) & vis
    raise TypeError(f"keep_rows cannot walk a {type(node).__name__} node")


@torch.no_grad()
def row_recall(q, k, v, keep, rows, *, scale: float | None = None, key_padding_mask=None) -> dict:
    """Per (batch, query head): mean recall over ``rows`` and the output's relative error, from
    full attention's softmax at those rows (``[B, Hq, R, Nk]`` scores, GQA without repeating K/V).
    A row that keeps nothing (a token dropped by Token Sparse) has recall 0 and output 0."""
    B, Hq, _, D = q.shape
    Hkv, g = k.shape[1], q.shape[1] // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    R = rows.shape[-1]
    qr = q.gather(2, rows[..., None].expand(-1, -1, -1, D)).float().view(B, Hkv, g, R, D)
    s = torch.einsum("bhgrd,bhnd->bhgrn", qr, k.float()).view(B, Hq, R, -1) * scale
    vis = _visible(q, k, rows, key_padding_mask)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    kept = p * keep
    mass = kept.sum(-1)  # [B, Hq, R]
    sparse = kept / mass.clamp_min(1e-30)[..., None]

    def out(w):
        return torch.einsum("bhgrn,bhnd->bhgrd", w.view(B, Hkv, g, R, -1), v.float()).reshape(B, Hq, R, D)

    o_full, o_sparse = out(p), out(sparse)
    err = (o_sparse - o_full).pow(2).sum((-1, -2)).sqrt() / o_full.pow(2).sum((-1, -2)).sqrt().clamp_min(1e-30)
    return {"recall": mass.mean(-1), "rel_error": err}


class RecallProbe:
    """Attention recall and output error per layer and head, gathered during a patched forward:
    ``with attnzoo.patch(model, stack, probe=RecallProbe()) as m: m(ids)``, then ``layers()``.
    Prefill calls only (decode steps are skipped); unpadded batches only (compare's prompts)."""

    def __init__(self, rows: int = ROWS):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
        self.rows = rows
        self._layers: dict[int, dict] = {}

    def __call__(self, layer: int, node, q, k, v, ctx) -> None:
        if ctx.decode or q.shape[2] != k.shape[2]:
            return
        if ctx.key_padding_mask is not None:
            raise ValueError("RecallProbe measures unpadded prompts; the batch has a key_padding_mask")
        rows = sample_rows(q.shape[2], self.rows, q.device).expand(q.shape[0], q.shape[1], -1)
        ctx = replace(ctx, meter=None)
        keep = keep_rows(node, q, k, ctx, rows)
        got = row_recall(q, k, v, keep, rows, scale=ctx.scale)
        self._layers[layer] = {name: t.mean(0).cpu() for name, t in got.items()}  # mean over the batch

    def layers(self) -> dict[int, dict]:
        """``{layer: {"recall": [Hq], "rel_error": [Hq]}}`` (lists of floats) of the last forward."""
        return {i: {name: t.tolist() for name, t in d.items()} for i, d in sorted(self._layers.items())}

    def reset(self) -> None:
        self._layers.clear()
