"""Each selector against its slow, obviously-correct loop reference (``attnzoo.selectors.naive``),
plus the method's own invariants and config errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.context import CallContext
from attnzoo.plans import BlockPlan, DensePlan, TokenPlan
from attnzoo.plans.geometry import last_visible_block
from attnzoo.selectors.naive import quest_slow, streaming_slow, token_coverage_slow, topk_slow, xattention_slow

from .conftest import make_qkv, padding_mask


def _qk(B, Hq, Hkv, Nq, Nk, D, seed=0):
    q, k, _ = make_qkv(B, Hq, Hkv, Nq, Nk, D, torch.float64, seed=seed)
    return q * 2, k * 2  # sharper attention than unit Gaussians: selections are not all-or-nothing


# -- XAttention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,S,b,tau,tail", [
    (2, 4, 2, 96, 96, 4, 16, 0.9, 0),
    (1, 3, 1, 70, 100, 4, 16, 0.7, 0),  # chunked prefill, lengths not multiples of the block
    (2, 2, 2, 64, 64, 8, 16, [0.5, 1.0], 0),  # per-head thresholds
    (2, 4, 2, 96, 96, 4, 16, 0.5, 20),  # a dense tail spanning two blocks of the unpadded row
    (1, 3, 1, 70, 100, 4, 16, 0.5, 7),  # ... with queries offset from the keys
])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_xattention_matches_slow_reference(B, Hq, Hkv, Nq, Nk, S, b, tau, tail, pad):
    q, k = _qk(B, Hq, Hkv, Nq, Nk, 8, seed=Nq)
    kpm = padding_mask(B, Nk, pad)
    sel = attnzoo.create("selector", {"name": "xattention", "threshold": tau, "stride": S,
                                      "block_size": b, "chunk_size": 2 * b, "dense_tail": tail})
    # the mask as given, left padding included (scoring under any mask; the stack aligns starts):
    # starts_aligned skips the refusal of left padding that a direct call gets
    plan = sel(q, k, CallContext(key_padding_mask=kpm, starts_aligned=True))
    taus = tau if isinstance(tau, list) else [tau] * Hq
    expected = xattention_slow(q, k, taus, S, b, kpm, dense_tail=tail)
    assert torch.equal(plan.to_block_mask(), expected)
    if tail:  # the rule must be doing something here, or the comparison above proves nothing
        assert not torch.equal(expected, xattention_slow(q, k, taus, S, b, kpm))


@pytest.mark.parametrize("cap", [32, 8])  # two blocks per chunk; below one block (one per chunk)
def test_xattention_cpu_chunks_below_chunk_size(cap, setting):
    """On a CPU the torch scorer takes query chunks of setting ``cpu_score_chunk_tokens`` (skipping more causally
    dead columns) below the selector's ``chunk_size``: the plans still equal the slow reference,
    under padding with queries offset from the keys."""
    from attnzoo.ops import antidiagonal

    setting(cpu_score_chunk_tokens=cap)
    q, k = _qk(2, 4, 2, 90, 100, 8, seed=5)
    kpm = padding_mask(2, 100, "right")
    kw = dict(stride=4, block_size=16, chunk_size=4096)
    chunks = [(i0, i1) for i0, i1, _ in antidiagonal.antidiagonal_block_scores(q, k, key_padding_mask=kpm, **kw)]
    step = max(1, cap // 16)
    assert chunks == [(i, min(6, i + step)) for i in range(0, 6, step)]
    sel = attnzoo.create("selector", {"name": "xattention", "threshold": 0.7, **kw})
    expected = xattention_slow(q, k, [0.7] * 4, 4, 16, kpm)
    assert torch.equal(sel(q, k, CallContext(key_padding_mask=kpm)).to_block_mask(), expected)


def test_xattention_dense_tail_rows():
    """The tail rows are exactly tau = 1's rows; the others are untouched; under right padding the
    tail moves with each sequence's end."""
    q, k = _qk(2, 2, 1, 128, 128, 8, seed=3)
    kpm = torch.ones(2, 128, dtype=torch.bool)
    kpm[1, 90:] = False  # sequence 1 ends at 90: its tail (50..89 for 40 tokens) is blocks 3-5 of 8
    make = lambda **kw: attnzoo.create("selector", {"name": "xattention", "stride": 4, "block_size": 16,
                                                    "threshold": 0.3, **kw})(q, k, CallContext(key_padding_mask=kpm))
    tail, base, full = (make(dense_tail=40).to_block_mask(), make().to_block_mask(),
                        make(threshold=1.0).to_block_mask())
    rows = {0: [5, 6, 7], 1: [3, 4, 5]}  # 88..127 -> blocks 5-7; 50..89 -> 3-5
    for bi, tail_rows in rows.items():
        other = [i for i in range(8) if i not in tail_rows]
        assert torch.equal(tail[bi][:, tail_rows], full[bi][:, tail_rows])
        assert torch.equal(tail[bi][:, other], base[bi][:, other])
        assert not torch.equal(base[bi][:, tail_rows], full[bi][:, tail_rows])


def test_xattention_invariants():
    q, k = _qk(2, 4, 2, 300, 300, 16, seed=1)
    make = lambda **kw: attnzoo.create("selector", {"name": "xattention", "stride": 4, "block_size": 32, **kw})
    plans = {t: make(threshold=t)(q, k) for t in (0.3, 0.6, 0.9, 1.0)}
    ds = [plans[t].density() for t in (0.3, 0.6, 0.9, 1.0)]
    assert ds == sorted(ds), "density must not increase as tau falls"
    assert plans[1.0].density() == pytest.approx(1.0), "tau = 1 keeps every causal block"
    for t in (0.3, 0.6, 0.9):  # lower tau selects a subset
        lo, hi = plans[t].to_block_mask(), plans[1.0].to_block_mask()
        assert not (lo & ~hi).any()
    bm = plans[0.3].to_block_mask()
    assert bm[..., 0].all(), "sink block kept"
    diag = torch.arange(bm.shape[2])
    assert bm[..., diag, diag].all(), "diagonal block kept"
    # chunked == unchunked
    a = make(threshold=0.8, chunk_size=32)(q, k).to_block_mask()
    b_ = make(threshold=0.8, chunk_size=4096)(q, k).to_block_mask()
    assert torch.equal(a, b_)
    # per-KV-head plan is the union of its group
    union = make(threshold=0.8, per_kv_head=True)(q, k)
    assert union.heads == 2
    assert torch.equal(union.to_block_mask(), a.view(2, 2, 2, *a.shape[2:]).any(2))
    # the union covers every member head, so it is at least as dense as the densest of its group
    per_q = make(threshold=0.8)(q, k).density(reduce=False)  # [B, Hq]
    assert (union.density(reduce=False) >= per_q.view(2, 2, 2).amax(-1) - 1e-12).all()


@pytest.mark.parametrize("spec,match", [
    ({"threshold": 0.0}, "threshold must lie in"),
    ({"threshold": 1.5}, "threshold must lie in"),
    ({"threshold": [0.5, 2.0]}, "threshold must lie in"),
    ({"stride": 6, "block_size": 64}, "stride .* must divide"),
    ({"block_size": 96}, "power of two"),
    ({"chunk_size": 100}, "multiple of block_size"),
    ({"dense_tail": -1}, "dense_tail must be >= 0"),
])
def test_xattention_bad_config(spec, match):
    with pytest.raises(ValueError, match=match):
        attnzoo.create("selector", {"name": "xattention", **spec})


def test_xattention_per_head_threshold_count_is_checked():
    q, k = _qk(1, 4, 2, 64, 64, 8)
    sel = attnzoo.create("selector", {"name": "xattention", "threshold": [0.5, 0.9], "block_size": 16,
                                      "stride": 4})
    with pytest.raises(ValueError, match="2 per-head values; q has 4 heads"):
        sel(q, k)


# -- streaming -----------------------------------------------------------------------------------

@pytest.mark.parametrize("Nq,Nk,sink,local,b", [(300, 300, 32, 64, 32), (1, 1000, 128, 256, 64),
                                                (100, 777, 0, 100, 16), (64, 64, 1000, 0, 16)])
def test_streaming_matches_slow_reference(Nq, Nk, sink, local, b):
    q, k = _qk(2, 4, 2, Nq, Nk, 8)
    sel = attnzoo.create("selector", {"name": "streaming", "sink": sink, "local": local, "block_size": b})
    plan = sel(q, k)
    assert plan.heads == 2
    expected = streaming_slow(Nq, Nk, sink, local, b)
    assert torch.equal(plan.to_block_mask(), expected.expand(2, 2, *expected.shape))


@pytest.mark.parametrize("spec,match", [({"sink": -1}, "sink must be >= 0"), ({"local": -5}, "local must be >= 0"),
                                        ({"block_size": 48}, "power of two")])
def test_streaming_bad_config(spec, match):
    with pytest.raises(ValueError, match=match):
        attnzoo.create("selector", {"name": "streaming", **spec})


# -- top-k blocks --------------------------------------------------------------------------------

@pytest.mark.parametrize("Nq,Nk,b,top_k,sink,local", [(128, 128, 16, 3, 0, 0), (50, 130, 16, 4, 0, 0),
                                                      (64, 64, 8, 1, 0, 0), (160, 160, 16, 2, 16, 32),
                                                      (50, 130, 16, 1, 0, 20), (96, 96, 8, 3, 12, 0)])
def test_topk_blocks_matches_slow_reference(Nq, Nk, b, top_k, sink, local):
    q, k = _qk(2, 4, 2, Nq, Nk, 8, seed=Nk)
    sel = attnzoo.create("selector", {"name": "topk_blocks", "block_size": b, "top_k": top_k, "chunk_size": 2 * b,
                                      "sink": sink, "local": local})
    plan = sel(q, k)
    assert plan.heads == 2, "shared across the GQA group"
    want = topk_slow(q, k, b, top_k, sink, local)
    assert torch.equal(plan.to_block_mask(), want)
    if sink or local:  # the window and the sink come on top of the top-k picks
        assert bool((want & ~topk_slow(q, k, b, top_k)).any())
    extra = -(-sink // b) + -(-local // b)
    assert int(plan.kv_counts.max()) <= max(top_k, 2) + extra


@pytest.mark.parametrize("spec,match", [({"top_k": 0}, "top_k must be an integer >= 1"),
                                        ({"block_size": 12}, "power of two"), ({"local": -1}, "local"),
                                        ({"sink": "16"}, "sink")])
def test_topk_bad_config(spec, match):
    with pytest.raises(ValueError, match=match):
        attnzoo.create("selector", {"name": "topk_blocks", **spec})


# -- token coverage ------------------------------------------------------------------------------

def test_token_coverage_matches_slow_reference():
    q, k = _qk(1, 3, 1, 120, 120, 8, seed=5)
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": 0.2, "window": 16,
                                      "min_tokens": 20})
    plan = sel(q, k)
    expected = token_coverage_slow(q, k, 0.2, 16, 20, 7)
    assert isinstance(plan, TokenPlan) and expected is not None
    assert torch.equal(plan.keep_mask()[0], expected)
    assert (plan.lengths == int(expected[0].sum())).all()


def test_token_coverage_dense_fallbacks_and_padding():
    q, k = _qk(2, 4, 2, 200, 200, 8)
    sel = lambda **kw: attnzoo.create("selector", {"name": "token_coverage", "window": 16, **kw})
    assert isinstance(sel(min_tokens=1024)(q, k), DensePlan), "N <= min_tokens + W runs dense"
    assert isinstance(sel(min_tokens=20, coverage=1e-12)(q, k), DensePlan), "nothing to drop runs dense"
    assert isinstance(sel(min_tokens=20)(q[:, :, -1:], k), DensePlan), "decode runs dense"
    kpm = padding_mask(2, 200, "right")
    plan = sel(min_tokens=20, coverage=0.3)(q, k, CallContext(key_padding_mask=kpm))
    assert isinstance(plan, TokenPlan)
    assert not (plan.keep_mask() & ~kpm[:, None]).any(), "padding is never kept"
    per_kv = sel(min_tokens=20, coverage=0.3, per_kv_head=True)(q, k)
    assert per_kv.heads == 2
    # batch elements are independent
    alone = sel(min_tokens=20, coverage=0.3)(q[1:], k[1:], CallContext(key_padding_mask=kpm[1:]))
    assert torch.equal(alone.keep_mask()[0], plan.keep_mask()[1])


@pytest.mark.parametrize("max_keep", [0.3, 0.6])
@pytest.mark.parametrize("coverage", [0.2, 1e-12])
def test_token_coverage_max_keep_caps_the_kept_tokens(max_keep, coverage):
    """With max_keep each head keeps at most max(min_tokens, ceil(max_keep * P)) prefix tokens (the
    slow reference's choice, also where the coverage finds nothing to drop), and the plan's width
    is a function of N alone: the same for another input."""
    N, W, m = 120, 16, 20
    q, k = _qk(1, 3, 1, N, N, 8, seed=5)
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": coverage, "window": W,
                                      "min_tokens": m, "max_keep": max_keep})
    plan = sel(q, k)
    expected = token_coverage_slow(q, k, coverage, W, m, 7, max_keep=max_keep)
    cap = max(m, math.ceil(max_keep * (N - W)))
    assert isinstance(plan, TokenPlan) and expected is not None
    assert torch.equal(plan.keep_mask()[0], expected)
    assert int(plan.lengths.max()) <= cap + W == plan.max_len == sel.width(N)
    assert (expected[:, : N - W].sum(-1) <= cap).all()
    other = sel(*_qk(1, 3, 1, N, N, 8, seed=6))
    assert other.max_len == plan.max_len
    uncapped = token_coverage_slow(q, k, coverage, W, m, 7)
    if coverage < 1e-6:
        assert uncapped is None, "nothing to drop without the cap: the cap alone drops here"


def test_token_coverage_max_keep_that_cannot_bind_changes_nothing():
    q, k = _qk(1, 3, 1, 120, 120, 8, seed=5)
    base = {"name": "token_coverage", "coverage": 0.2, "window": 16, "min_tokens": 20}
    loose = attnzoo.create("selector", {**base, "max_keep": 1.0})
    assert loose.width(120) is None
    assert torch.equal(loose(q, k).keep_mask(), attnzoo.create("selector", base)(q, k).keep_mask())


@pytest.mark.parametrize("pad", ["none", "right", "left", "holes"])
@pytest.mark.parametrize("per_kv_head,max_keep", [(False, None), (True, None), (False, 0.4), (True, 0.4)])
def test_token_coverage_batch_equals_each_sequence_by_the_slow_reference(pad, per_kv_head, max_keep):
    """A padded batch decided on the device at once: each sequence keeps exactly what the slow
    per-sequence reference keeps on its own real tokens (fp64), or all of them where it finds
    nothing to drop or is too short; padding is never kept."""
    B, N = 4, 150
    q, k = (t.double() for t in _qk(B, 4, 2, N, N, 8, seed=11))
    kpm = torch.ones(B, N, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    for b, n in enumerate((150, 131, 97, 40)):  # the last is too short: it keeps all its tokens
        if pad in ("right", "none"):
            kpm[b, n:] = False
        elif pad == "left":
            kpm[b, : N - n] = False
        else:
            kpm[b] = torch.rand(N, generator=g) < n / N
    kpm = None if pad == "none" else kpm
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": 0.2, "window": 16, "min_tokens": 20,
                                      "per_kv_head": per_kv_head, "max_keep": max_keep})
    plan = sel(q, k, CallContext(key_padding_mask=kpm, starts_aligned=True))
    if max_keep is not None:
        assert plan.max_len == sel.width(N), "a capped plan's width is static"
    keep = plan.keep_mask()
    some_dropped = False
    for b in range(B):
        real = torch.arange(N) if kpm is None else kpm[b].nonzero().squeeze(-1)
        qb, kb = q[b:b + 1, :, real], k[b:b + 1, :, real]
        if per_kv_head:  # the group's mean importance: the slow reference scores per query head
            expected = sel(qb, kb)
            expected = expected.keep_mask()[0] if isinstance(expected, TokenPlan) else None
        else:
            expected = token_coverage_slow(qb, kb, 0.2, 16, 20, 7, max_keep) if len(real) > 36 else None
        got = keep[b][:, real]
        assert not keep[b][:, ~torch.isin(torch.arange(N), real)].any(), "padding kept"
        assert torch.equal(got, torch.ones_like(got) if expected is None else expected), f"sequence {b}"
        some_dropped |= expected is not None
    assert some_dropped, "every sequence kept everything: the comparison is empty"


def test_token_coverage_reads_nothing_on_the_host():
    """The selection itself makes no host read (the GPU-sync proxy of tests/sync_probe.py); only
    the plan's width is read when the plan is built."""
    from .sync_probe import OpProbe

    q, k = _qk(2, 4, 2, 300, 300, 16, seed=2)
    kpm = padding_mask(2, 300, "right")
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": 0.2, "window": 16, "min_tokens": 20})
    a = sel.importance(q, k, kpm.sum(-1))
    with OpProbe() as probe:
        keep = sel.keep_mask(a, kpm.sum(-1))
        sel.importance(q, k, kpm.sum(-1))
    assert not probe.syncs, dict(probe.syncs)
    assert keep.any() and not keep.all()


def test_token_coverage_with_max_keep_reads_nothing_on_the_host(monkeypatch):
    """With a cap the whole selection, plan included, makes no host read (values unchecked, as on a GPU)."""
    from .sync_probe import OpProbe

    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "0")
    q, k = _qk(2, 4, 2, 300, 300, 16, seed=2)
    ctx = CallContext(key_padding_mask=padding_mask(2, 300, "right"), starts_aligned=True)
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": 0.2, "window": 16, "min_tokens": 20,
                                      "max_keep": 0.5})
    with OpProbe() as probe:
        plan = sel(q, k, ctx)
    assert not probe.syncs, dict(probe.syncs)
    assert isinstance(plan, TokenPlan) and plan.max_len == sel.width(300) < 300


@pytest.mark.parametrize("spec,match", [({"coverage": 0.0}, "coverage must lie in"),
                                        ({"window": 0}, "window must be > 0"),
                                        ({"min_tokens": -1}, "min_tokens must be >= 0"),
                                        ({"pool_kernel": 4}, "odd"),
                                        ({"max_keep": 0.0}, "max_keep must lie in"),
                                        ({"max_keep": 1.5}, "max_keep must lie in")])
def test_token_coverage_bad_config(spec, match):
    with pytest.raises(ValueError, match=match):
        attnzoo.create("selector", {"name": "token_coverage", **spec})


def test_block_plan_types():
    q, k = _qk(1, 2, 2, 64, 64, 8)
    for name in ("xattention", "streaming", "topk_blocks"):
        assert isinstance(attnzoo.create("selector", name)(q, k), BlockPlan)


def test_topk_chunked_equals_unchunked_and_budget():
    q, k = _qk(2, 6, 2, 300, 300, 16, seed=3)
    mk = lambda c: attnzoo.create("selector", {"name": "topk_blocks", "block_size": 16, "top_k": 5, "chunk_size": c})
    a, b = mk(16)(q, k), mk(4096)(q, k)
    assert torch.equal(a.to_block_mask(), b.to_block_mask())
    assert int(a.kv_counts.max()) == 5
    diag = torch.arange(a.num_q_blocks)
    assert a.to_block_mask()[..., diag, diag].all(), "own block kept"


# -- Quest (decode page selection) ------------------------------------------------------------------

@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
@pytest.mark.parametrize("Nq,Nk", [(1, 300), (1, 257), (40, 300), (96, 96)])  # decode, chunked prefill, prefill
def test_quest_matches_slow_reference(Nq, Nk, per_kv_head):
    q, k = _qk(2, 4, 2, Nq, Nk, 8, seed=Nk + Nq)
    sel = attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 64, "per_kv_head": per_kv_head})
    plan = sel(q, k)
    assert plan.heads == (2 if per_kv_head else 4)
    assert torch.equal(plan.to_block_mask(), quest_slow(q, k, 16, 64, per_kv_head))
    assert (plan.kv_counts <= 4).all() and plan.density() < 1
    if per_kv_head:  # a group's pages: the union of no head's own choice in general, but a choice of 4
        assert not torch.equal(plan.to_block_mask().repeat_interleave(2, 1), quest_slow(q, k, 16, 64))


@pytest.mark.parametrize("local", [0, 32])
def test_quest_bounds_kept_in_the_cache_while_decoding(monkeypatch, local):
    """Decoding token by token with the layer's cache: the bound buffers (grown on the way) keep
    every page's exact bounds, only the growing last page is updated per step, and every step's plan
    is Quest's (the fp64 loop reference's sink, own page, local window and best bounds)."""
    from attnzoo.selectors.quest import Quest

    monkeypatch.setattr(Quest, "GROW_PAGES", 4)  # grow the buffers a few times on the way
    q, k = _qk(1, 4, 2, 1, 340, 8, seed=4)
    sel = attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 64 + local, "local": local})
    cache = {}
    sel(q, k[:, :, :250], CallContext(cache=cache, decode=True))  # the first step fills the buffers
    for n in range(251, 341):
        step = sel(q, k[:, :, :n], CallContext(cache=cache, decode=True))
        tokens, lo, hi = cache[("quest_pages", id(sel))]
        assert tokens == n and lo.shape[2] >= -(-n // 16)
        ref_lo, ref_hi = sel.page_bounds(k[:, :, :n])
        assert torch.equal(lo[:, :, :ref_lo.shape[2]], ref_lo) and torch.equal(hi[:, :, :ref_hi.shape[2]], ref_hi)
        if not local:
            assert torch.equal(step.to_block_mask(), quest_slow(q, k[:, :, :n], 16, 64)), n
        else:  # the window's pages before the own page are read whatever their bound
            mask = step.to_block_mask()
            own = (n - 1) // 16
            assert mask[..., [0, *range(own - 2, own + 1)]].all() and (step.kv_counts <= (64 + local) // 16).all()


def test_quest_decode_step_reads_nothing_on_the_host(monkeypatch):
    """A decode step with the bounds in the cache makes no host read (the GPU-sync proxy of
    tests/sync_probe.py): the torch backends here; on a GPU the two ops are one Triton launch each
    (tests/test_kernels.py::test_triton_page_scores_equal_torch checks the scores against these)."""
    from .sync_probe import OpProbe

    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "0")
    q, k = _qk(2, 6, 2, 1, 1000, 16, seed=6)
    sel = attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 128, "local": 32})
    cache = {}
    sel(q, k[:, :, :999], CallContext(cache=cache, decode=True))
    with OpProbe() as probe:
        plan = sel(q, k, CallContext(cache=cache, decode=True))
    assert not probe.syncs, dict(probe.syncs)
    assert plan.max_blocks <= 128 // 16 + 2 and (plan.kv_counts == 128 // 16).all()


def test_quest_budget_holding_everything_is_dense_and_bad_config():
    q, k = _qk(1, 2, 1, 1, 60, 8)
    assert isinstance(attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 64})(q, k), DensePlan)
    with pytest.raises(ValueError, match="the sink's page, the query's own"):
        attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 16})
    with pytest.raises(ValueError, match="local window's"):
        attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 64, "local": 64})
    with pytest.raises(ValueError, match="local must be >= 0"):
        attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": 64, "local": -1})


@pytest.mark.parametrize("Nq", [1, 40])
def test_quest_local_window_pages_are_always_read(Nq):
    """``local``: the pages just before each query block's own are kept whatever their bound (within
    the budget), the sink page too; without it they compete on their bounds."""
    q, k = _qk(2, 6, 2, Nq, 700, 16, seed=5)
    p, local = 16, 96
    plan = attnzoo.create("selector", {"name": "quest", "page_size": p, "budget": 256, "local": local})(
        q, k, CallContext(decode=Nq == 1))
    plan.validate(q, k)
    mask = plan.to_block_mask()  # [B, Hq, nqb, pages]
    last = last_visible_block(Nq, 700, p, p)
    for i, own in enumerate(last.tolist()):
        window = list(range(max(0, own - local // p), own + 1))
        assert mask[:, :, i, window].all() and mask[:, :, i, 0].all()
        assert int(mask[:, :, i].sum(-1).max()) <= 256 // p
    with pytest.raises(ValueError, match="page_size must be a positive power of two"):
        attnzoo.create("selector", {"name": "quest", "page_size": 12})


def test_page_scores_bad_shapes_name_the_argument():
    from attnzoo.ops import pages

    q, k = _qk(1, 4, 2, 1, 100, 8)
    lo = hi = torch.zeros(1, 2, 7, 8)
    with pytest.raises(ValueError, match="one decode query"):
        pages.page_scores(q.expand(1, 4, 2, 8), lo, hi, n_pages=7, forced_lo=6, page_size=16)
    with pytest.raises(ValueError, match=r"lo / hi must both be \[B, Hkv"):
        pages.page_scores(q, lo[:, :, :, :4], hi[:, :, :, :4], n_pages=7, forced_lo=6, page_size=16)
    with pytest.raises(ValueError, match=r"lo / hi must both be"):
        pages.page_scores(q[:, :3], lo, hi, n_pages=7, forced_lo=6, page_size=16)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match=r"k must be .* ceil\(Nk / page_size\) = n_pages"):
        pages.page_scores(q, lo, hi, n_pages=6, forced_lo=5, page_size=16, k=k)
    with pytest.raises(ValueError, match=r"forced_lo must be an int in \[0, n_pages\)"):
        pages.page_scores(q, lo, hi, n_pages=7, forced_lo=7, page_size=16, k=k)
    with pytest.raises(TypeError, match="own_page and forced_lo must both be"):
        pages.page_scores(q, lo, hi, n_pages=7, forced_lo=5, page_size=16, k=k, own_page=torch.tensor([6]))
    assert pages.page_scores(q, lo.clone(), hi.clone(), n_pages=7, forced_lo=6, page_size=16, k=k).shape == (1, 4, 1, 7)
