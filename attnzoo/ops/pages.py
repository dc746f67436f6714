"""Quest's page scores for a decode step (an op with backends): each page's upper bound on q . k,
written as ranking keys for ``ops.selection.top_n``.

For the query ``q`` ``[B, Hq, 1, D]`` of one generated token and page bounds ``lo`` / ``hi``
``[B, Hkv, >= n_pages, D]`` (the element-wise minimum and maximum of each page's keys; a page of
padding only holds ``lo = +inf``, ``hi = -inf``)::

    bound[b, h, j] = sum_d max(q_d lo_d, q_d hi_d) = relu(q) . hi + min(q, 0) . lo      (fp32)

The scores ``[B, Hq, 1, n_pages]`` hold, per page, a non-negative float32 whose *bits* order as
the bound does (``order_keys``): ``top_n`` finds its cut by a binary search over score bits, which
needs scores >= 0, and Quest's bounds have either sign. The last page (the query's own, which
``top_n`` keeps as its forced block) and pages of padding only hold -1 (not candidates); page 0
(the attention sink) and pages ``[forced_lo, n_pages - 1)`` (a local window) hold a key above every
bound, so they are always among the picked pages.

With ``k`` ``[B, Hkv, Nk, D]`` the last page's bounds (the only page still growing while tokens
append) are recomputed from its keys (padding left out) and written into ``lo`` / ``hi`` first: a
decode step reads its cache's bounds once and updates them in place. Bounds are stored in the keys'
dtype: the minimum and maximum of bf16 keys are bf16 values, so nothing is rounded.

Backends: ``torch`` (the reference: two products per KV head group) and ``triton``
(``kernels.triton_pages``: one launch, bounds read once per KV head for its query group).
"""

from __future__ import annotations

import struct

import torch

from .dispatch import DEFAULT_TOLERANCES, Backend, Tolerance, choose, make_request, register_backend

# scores feed a discrete choice: tests compare the pages picked and the keys' order, these bound
# the bounds' relative error per input dtype (fp32 sums in another order)
TOLERANCES = {**DEFAULT_TOLERANCES, torch.float64: Tolerance(out=1e-10, lse=1e-10, grad=1e-10)}

# keys of real bounds lie in [0, 2**30); the sink page's is above them all (floats < 2.0: no NaN bits)
SINK_KEY = 1 << 30
SINK_SCORE = struct.unpack("f", struct.pack("i", SINK_KEY))[0]


def order_keys(bound: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 tensor whose int32 bits order as ``bound`` (fp32) does, to 2**-21
    relative (the two lowest bits dropped to keep the keys below +inf's bits); ties go to the
    lower page in ``top_n``."""
    bits = bound.float().contiguous().view(torch.int32)
    mag = bits & 0x7FFFFFFF
    key = torch.where(bits < 0, (0x7FFFFFFF - mag) >> 2, (mag >> 2) + (1 << 29))
    return key.view(torch.float32)


def finite_bounds(lo: torch.Tensor, hi: torch.Tensor):
    """``(lo, hi, empty)``: fp32 bounds with the +-inf of pages of padding only set to 0, and which
    pages those are (``[B, Hkv, pages]``), for ``page_bound``."""
    lo, hi = lo.float(), hi.float()
    empty = torch.isinf(lo).all(-1)
    return lo.masked_fill(torch.isinf(lo), 0.0), hi.masked_fill(torch.isinf(hi), 0.0), empty


def page_bound(q_rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, R, pages]`` Quest's bound ``relu(q) . hi + min(q, 0) . lo`` of query rows ``[B, Hkv,
    R, D]`` (a KV head's query group folded into R) against ``finite_bounds``' lo / hi (fp32)."""
    q_rows = q_rows.float()
    return q_rows.clamp(min=0) @ hi.transpose(-1, -2) + q_rows.clamp(max=0) @ lo.transpose(-1, -2)


def last_page_bounds(k: torch.Tensor, last, page_size: int, key_padding_mask=None):
    """``(lo, hi)`` ``[B, Hkv, D]`` fp32 of page ``last``'s real keys (+inf / -inf where it has none);
    ``last`` an int or a ``[1]`` int64 tensor (a static decode's own page, never read on the host)."""
    Nk = k.shape[2]
    if isinstance(last, torch.Tensor):
        pos = last * page_size + torch.arange(page_size, device=k.device)
        real = (pos < Nk)[None, :]
        pos = pos.clamp(max=Nk - 1)
        kl = k.index_select(2, pos).float()
        if key_padding_mask is not None:
            real = real & key_padding_mask.index_select(1, pos)
    else:
        kl = k[:, :, last * page_size:(last + 1) * page_size].float()
        real = None if key_padding_mask is None else key_padding_mask[:, last * page_size:(last + 1) * page_size]
    if real is None:
        return kl.amin(2), kl.amax(2)
    real = real[:, None, :, None]
    return kl.masked_fill(~real, float("inf")).amin(2), kl.masked_fill(~real, float("-inf")).amax(2)


def _torch(q, lo, hi, *, n_pages: int, forced_lo, page_size: int, k=None, key_padding_mask=None,
           per_kv_head: bool = False, own_page=None):
    B, Hq, _, D = q.shape
    Hkv = lo.shape[1]
    last = n_pages - 1 if own_page is None else own_page
    if k is not None:
        lo_l, hi_l = last_page_bounds(k, last, page_size, key_padding_mask)
        if own_page is None:
            lo[:, :, last], hi[:, :, last] = lo_l, hi_l
        else:
            lo.index_copy_(2, own_page, lo_l[:, :, None].to(lo.dtype))
            hi.index_copy_(2, own_page, hi_l[:, :, None].to(hi.dtype))
    lf, hf, empty = finite_bounds(lo[:, :, :n_pages], hi[:, :, :n_pages])
    bound = page_bound(q.reshape(B, Hkv, Hq // Hkv, D), lf, hf)  # [B, Hkv, g, pages]
    page = torch.arange(n_pages, device=q.device)
    scores = torch.where(~empty[:, :, None], order_keys(bound), -1.0)
    always = (page == 0) | (page >= forced_lo)
    scores = torch.where(always, SINK_SCORE, scores)
    # the own page is top_n's forced block; pages after it (a static cache's unwritten slots) are none
    scores = torch.where(page >= last, -1.0, scores)
    if per_kv_head:  # a group's best bound (keys order as bounds do; the fixed keys agree within a group)
        return scores.amax(2)[:, :, None]
    return scores.reshape(B, Hq, 1, n_pages)


register_backend(Backend(
    op="page_scores", name="torch", fn=_torch, devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), plan_kinds=("scores",),
    backward=False, lse=False, tolerances=TOLERANCES,
    description="torch: relu(q) . hi + min(q, 0) . lo per KV head group, ranking keys"))


def page_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, *, n_pages: int, forced_lo,
                page_size: int, k: torch.Tensor | None = None, key_padding_mask=None, per_kv_head: bool = False,
                own_page: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """``[B, Hq, 1, n_pages]`` ranking scores of Quest's pages for one decode query (module doc);
    ``per_kv_head``: ``[B, Hkv, 1, n_pages]``, each page's highest bound over the KV head's query
    group (the group then reads one set of pages: each KV head's cache is read once).
    ``lo`` / ``hi`` are updated in place at page ``n_pages - 1`` when ``k`` is given.
    ``own_page`` (``[1]`` int64 on the device; ``forced_lo`` then a tensor like it): the query's page
    when it is not the last (a static cache's decode step: the pages after it are unwritten slots,
    never candidates); nothing is read on the host."""
    B, Hq, Nq, D = q.shape
    if Nq != 1:
        raise ValueError(f"page_scores scores one decode query per head, got q with {Nq} rows")
    if lo.shape != hi.shape or lo.ndim != 4 or lo.shape[0] != B or lo.shape[2] < n_pages or lo.shape[3] != D \
            or Hq % lo.shape[1]:
        raise ValueError(f"lo / hi must both be [B, Hkv, >= n_pages, D] = [{B}, a divisor of {Hq}, >= {n_pages}, "
                         f"{D}], got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if k is not None and (k.shape[:2] != lo.shape[:2] or k.shape[3] != D or -(-k.shape[2] // page_size) != n_pages):
        raise ValueError(f"k must be [B, Hkv, Nk, D] = [{B}, {lo.shape[1]}, Nk, {D}] with ceil(Nk / page_size) = "
                         f"n_pages ({n_pages}): its last page is the one updated; got {tuple(k.shape)}")
    if own_page is not None:
        if not (isinstance(own_page, torch.Tensor) and own_page.shape == (1,) and own_page.dtype == torch.int64
                and isinstance(forced_lo, torch.Tensor) and forced_lo.shape == (1,)):
            raise TypeError("own_page and forced_lo must both be [1] int64 tensors on q's device when own_page is "
                            f"given, got {own_page!r} and {forced_lo!r}")
    elif not isinstance(forced_lo, int) or not 0 <= forced_lo < n_pages:
        raise ValueError(f"forced_lo must be an int in [0, n_pages) = [0, {n_pages}), got {forced_lo}")
    req = make_request("page_scores", q.detach(), lo, lo, "scores", return_lse=False,
                       key_padding_mask=key_padding_mask, causal=False, block_size=(page_size, page_size))
    impl = choose(req, backend)
    return impl.fn(q.detach(), lo, hi, n_pages=n_pages, forced_lo=forced_lo, page_size=page_size,
                   k=k, key_padding_mask=key_padding_mask, per_kv_head=per_kv_head, own_page=own_page)
