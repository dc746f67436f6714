"""Quest (arXiv 2406.10774): query-aware page selection from per-page key bounds.

The keys are cut into pages of ``page_size`` tokens; each page keeps the element-wise minimum and
maximum of its keys. For a query q, ``sum_d max(q_d * min_d, q_d * max_d)`` bounds q . k from
above for every key of the page, so the pages with the highest bounds are the ones that can hold
the largest attention scores. Each query head reads the first page (the attention sink), its own
last visible page (with ``local``, also the pages of that many tokens before it: a local window, not
in the paper), and the best of the others up to ``budget`` tokens. ``per_kv_head=True`` lets a GQA
group share its pages (ranked by the group's highest bound), so a decode step reads each KV head's
pages once: on an H100 at a 128K cache (32/8 heads, 4K budget) per-head selection read the budget
four times over.

Made for decode (Nq = 1 against a long cache: what each generated token reads); a chunked prefill
or a prefill is handled per query block of ``page_size`` rows (the bound maximised over the
block's queries). Padding keys are left out of the bounds.

A decode step (Nq = 1) takes a short path: the bounds live in the layer's cache in buffers of the
keys' dtype with room to grow, ``ops.pages.page_scores`` updates the last, growing page in place and
scores every page (one Triton launch on a GPU), and ``ops.selection.top_n`` writes the plan's
ascending page list from those scores (one more): no ``[pages]``-wide mask, sort or scatter. On an
H100 the general path below took ~0.25 ms per step at a 128K cache even replayed from a CUDA graph,
five times a whole dense decode step of the embedded model (bench/results/2026-12-07-h100-decode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..caches import device_constant
from ..context import as_context
from ..ops import pages, selection
from ..plans import BlockPlan, DensePlan
from ..plans.geometry import cdiv, last_visible_block
from ..registry import register
from .base import check_block, check_positive, check_qk


@register("selector", "quest")
@dataclass
class Quest:
    plan_kind: ClassVar[str] = "block"
    decode: ClassVar[str] = "plan"  # chooses pages for every generated token
    # a static decode (ctx.static_decode) finds the query's page from the mask on the device, so
    # attnzoo.patch(..., static_decode=True) may run it on a static cache's every slot
    decode_by_mask: ClassVar[bool] = True
    small_config: ClassVar[dict] = {"page_size": 16, "budget": 64}

    page_size: int = 16
    budget: int = 4096  # tokens each query head reads (whole pages, the sink's and its own included)
    # tokens just before the query's own page read whatever their bound (a local window inside the
    # budget; not in the paper): 0 reads only the sink page and the own page unconditionally
    local: int = 0
    # a GQA group reads one set of pages, ranked by the group's highest bound per page: each KV
    # head's pages are read once for its query heads (not in the paper, which is MHA); the plan has
    # one row per KV head
    per_kv_head: bool = False

    def __post_init__(self):
        check_block("page_size", self.page_size)
        check_positive("budget", self.budget)
        check_positive("local", self.local, allow_zero=True)
        if not isinstance(self.per_kv_head, bool):
            raise TypeError(f"per_kv_head must be a bool, got {self.per_kv_head!r}")
        need = 2 * self.page_size + cdiv(self.local, self.page_size) * self.page_size
        if self.budget < need:
            raise ValueError(f"budget must hold the sink's page, the query's own and the local window's "
                             f"({self.local} tokens): {need} tokens, got {self.budget}")

    def page_bounds(self, k, key_padding_mask=None, cached=None):
        """``(min, max)`` ``[B, Hkv, pages, D]`` of each page's keys (fp32; padding left out: a page
        of padding only has min = +inf, max = -inf). ``cached``: ``(tokens, min, max)`` of an
        earlier call on a prefix of these keys; its full pages are kept, the rest recomputed."""
        B, Hkv, N, D = k.shape
        p, n_pages = self.page_size, cdiv(N, self.page_size)
        start = 0
        if cached is not None:
            tokens, lo_c, hi_c = cached
            if lo_c.shape[:2] == (B, Hkv) and tokens <= N and lo_c.device == k.device:
                start = tokens // p  # its full pages are final
        kf = k[:, :, start * p:].float()
        pad = n_pages * p - N
        real = torch.ones(B, N, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
        real = real[:, start * p:]
        if pad:
            kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
            real = torch.nn.functional.pad(real, (0, pad), value=False)
        kf = kf.view(B, Hkv, n_pages - start, p, D)
        r = real.view(B, 1, n_pages - start, p, 1)
        lo = kf.masked_fill(~r, float("inf")).amin(3)
        hi = kf.masked_fill(~r, float("-inf")).amax(3)
        if start:
            lo, hi = torch.cat([lo_c[:, :, :start], lo], 2), torch.cat([hi_c[:, :, :start], hi], 2)
        return lo, hi

    # score elements (query rows x pages x heads) per chunk of a long prefill
    CHUNK_ELEMENTS: ClassVar[int] = 1 << 24

    def block_bounds(self, q, lo, hi, rows_real=None):
        """``[B, Hq, Nqb, pages]`` (``per_kv_head``: ``[B, Hkv, ...]``, the group's best): each query
        block's highest bound on q . k per page over its real query rows (``rows_real`` ``[B, Nq]``;
        None: all). The bound ``sum_d max(q_d lo_d, q_d hi_d)`` is ``relu(q) . hi + min(q, 0) . lo``:
        two products, in chunks of query blocks (a padding-only page, or a block of padding rows
        only: -inf)."""
        B, Hq, Nq, D = q.shape
        Hkv, n_pages, p = lo.shape[1], lo.shape[2], self.page_size
        g, nqb = Hq // Hkv, cdiv(Nq, p)
        lo, hi, empty = pages.finite_bounds(lo, hi)
        step = max(1, self.CHUNK_ELEMENTS // max(1, p * n_pages * Hq))  # query blocks per chunk
        out = []
        for b0 in range(0, nqb, step):
            rows = q[:, :, b0 * p:(b0 + step) * p]
            n = rows.shape[2]
            bound = pages.page_bound(rows.reshape(B, Hkv, g * n, D), lo, hi)
            bound = bound.masked_fill(empty[:, :, None], float("-inf")).view(B, Hq, n, n_pages)
            if rows_real is not None:
                bound = bound.masked_fill(~rows_real[:, None, b0 * p:b0 * p + n, None], float("-inf"))
            blocks = cdiv(n, p)
            if blocks * p != n:  # rows past the last query never win the maximum
                bound = torch.nn.functional.pad(bound, (0, 0, 0, blocks * p - n), value=float("-inf"))
            out.append(bound.view(B, Hq, blocks, p, n_pages).amax(3))
        bound = torch.cat(out, 2)
        if self.per_kv_head:  # the group's highest bound per page
            return bound.view(B, Hkv, g, nqb, n_pages).amax(2)
        return bound

    @torch.no_grad()  # plans are discrete: selection never needs (or builds) a graph
    def __call__(self, q, k, ctx=None):
        ctx = as_context(ctx)
        check_qk(q, k, ctx)
        B, Hq, Nq, _ = q.shape
        Nk, p = k.shape[2], self.page_size
        n_pages, pick = cdiv(Nk, p), self.budget // p
        if pick >= n_pages:
            return DensePlan(Nq, Nk)  # the budget holds the whole cache
        if Nq == 1:
            return self._decode_plan(q, k, ctx)
        key = ("quest_bounds", id(self))
        cached = ctx.cache.get(key) if ctx.cache is not None and ctx.decode else None
        lo, hi = self.page_bounds(k, ctx.key_padding_mask, cached)
        if ctx.cache is not None:
            ctx.cache[key] = (Nk, lo, hi)
        kpm = ctx.key_padding_mask
        bound = self.block_bounds(q, lo, hi, None if kpm is None else kpm[:, Nk - Nq:])  # [B, Hq, nqb, pages]
        last = last_visible_block(Nq, Nk, p, p, q.device)  # [nqb]
        page = torch.arange(n_pages, device=q.device)
        visible = page[None, :] <= last[:, None]  # [nqb, pages]
        near = page[None, :] >= last[:, None] - cdiv(self.local, p)  # the own page and the local window
        forced = (page[None, :] == 0) | (near & visible)
        score = bound.masked_fill(~visible, float("-inf")).masked_fill(forced, float("inf"))
        top = score.topk(min(pick, n_pages), dim=-1).indices
        keep = torch.zeros(*score.shape, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
        return BlockPlan.from_block_mask(keep & visible, p, p, Nq, Nk, max_blocks=pick)

    # the decode path's bound buffers grow by this many pages at least (a copy per growth)
    GROW_PAGES: ClassVar[int] = 1024

    def decode_bounds(self, k, key_padding_mask=None, cache=None, static: bool = False):
        """``(lo, hi)`` ``[B, Hkv, capacity, D]`` in ``k``'s dtype: every page before the last final,
        the last left for ``ops.pages.page_scores`` to update. Kept in ``cache`` (the layer's) between
        decode steps, so a step recomputes nothing here; a first step (or another batch) fills the
        buffers once from the keys. ``static``: ``k`` holds every slot of a static cache, the query's
        page moves through them (``page_scores`` updates it); the last page starts empty."""
        B, Hkv, Nk, D = k.shape
        p, last = self.page_size, (k.shape[2] - 1) // self.page_size
        key = ("quest_pages", id(self))
        entry = cache.get(key) if cache is not None else None
        if entry is not None:
            tokens, lo, hi = entry
            if lo.shape[:2] != (B, Hkv) or lo.shape[3] != D or lo.dtype != k.dtype or lo.device != k.device \
                    or tokens > Nk:
                entry = None
        if entry is None:
            if static and key_padding_mask is not None and bool((~key_padding_mask[:, 0]).any()):
                # (the first step's one host read: a captured step replays after it)
                raise ValueError("static_decode: a left-padded batch is not supported (Quest would put its sink "
                                 "page on the padding); decode it with a dynamic cache, or one prompt at a time")
            tokens = 0
            cap = cdiv(last + 1 + self.GROW_PAGES // 4, self.GROW_PAGES) * self.GROW_PAGES
            lo = torch.empty(B, Hkv, cap, D, dtype=k.dtype, device=k.device)
            hi = torch.empty_like(lo)
            if static:
                lo[:, :, last], hi[:, :, last] = float("inf"), float("-inf")
        elif last >= lo.shape[2]:  # grow: double, at least GROW_PAGES more
            cap = max(2 * lo.shape[2], lo.shape[2] + self.GROW_PAGES, last + 1)
            lo, hi = (torch.cat([t, t.new_empty(B, Hkv, cap - t.shape[2], D)], 2) for t in (lo, hi))
        start = tokens // p  # pages before it are complete and final
        if start < last:  # pages [start, last) not yet final in the buffers: once, after a prefill
            kpm = key_padding_mask[:, start * p: last * p] if key_padding_mask is not None else None
            lo[:, :, start:last], hi[:, :, start:last] = self.page_bounds(k[:, :, start * p: last * p], kpm)
        if cache is not None:
            cache[key] = (Nk, lo, hi)
        return lo, hi

    def _decode_plan(self, q, k, ctx):
        """One generated token's pages (Nq = 1): see the module doc. A static decode finds the
        query's page on the device (the last slot the mask marks written)."""
        Nk, p = k.shape[2], self.page_size
        n_pages, pick = cdiv(Nk, p), self.budget // p
        kpm, static = ctx.key_padding_mask, ctx.static_decode and ctx.key_padding_mask is not None
        lo, hi = self.decode_bounds(k, kpm, ctx.cache, static=static)
        if static:
            slots = torch.arange(Nk, device=k.device)
            own = (torch.where(kpm.any(0), slots, 0).amax() // p).view(1)
            forced_lo = (own - cdiv(self.local, p)).clamp(min=0)
            n_pick = _rule_tensors(pick - 1, 0, 0, q.device)[0]
            own_lo = last_t = own
        else:
            last = n_pages - 1
            own, forced_lo = None, max(0, last - cdiv(self.local, p))
            n_pick, own_lo, last_t = _rule_tensors(pick - 1, last, last, q.device)
        scores = pages.page_scores(q, lo, hi, n_pages=n_pages, forced_lo=forced_lo, page_size=p, k=k,
                                   key_padding_mask=kpm, per_kv_head=self.per_kv_head, own_page=own)
        # the own page is top_n's forced block; the sink and the local window outrank every bound
        idx, cnt = selection.top_n(scores, n_pick, own_lo, last_t, width=pick)
        return BlockPlan(idx, cnt, p, p, 1, Nk)


def _rule_tensors(n_pick: int, own_lo: int, last: int, device):
    """``top_n``'s ``[1]`` int64 tensors for one decode step, kept (they change once per page, and the
    Triton backend keys its converted copies by identity; ``caches.device_constant``)."""
    return tuple(device_constant((x,), torch.int64, str(device)) for x in (n_pick, own_lo, last))
