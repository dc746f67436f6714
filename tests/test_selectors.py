"""Each selector against a slow, obviously-correct fp64 loop implementation of its algorithm,
plus the method's own invariants and config errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.plans import BlockPlan, DensePlan, TokenPlan
from attnzoo.selectors import Context

from .conftest import make_qkv, padding_mask


def _qk(B, Hq, Hkv, Nq, Nk, D, seed=0):
    q, k, _ = make_qkv(B, Hq, Hkv, Nq, Nk, D, torch.float64, seed=seed)
    return q * 2, k * 2  # sharper attention than unit Gaussians: selections are not all-or-nothing


# -- XAttention ----------------------------------------------------------------------------------

def xattention_slow(q, k, tau, S, b, kpm=None):
    """Loops straight from the method's description (fp64)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    nqb, nkb = -(-Nq // b), -(-Nk // b)
    nq_r, nk_r = nqb * b // S, nkb * b // S
    shift = (Nk - Nq + S - 1) // S
    out = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool)
    for bi in range(B):
        for h in range(Hq):
            Q, K = q[bi, h], k[bi, h // g]
            A = torch.zeros(nq_r, nk_r, dtype=torch.float64)
            for i in range(nq_r):
                for j in range(nk_r):
                    A[i, j] = sum(float(Q[i * S + S - 1 - t] @ K[j * S + t])
                                  for t in range(S) if i * S + S - 1 - t < Nq and j * S + t < Nk
                                  and (kpm is None or (kpm[bi, j * S + t] and kpm[bi, Nk - Nq + i * S + S - 1 - t])))
            P = torch.zeros_like(A)
            for i in range(nq_r):
                if i * S >= Nq or (kpm is not None and not kpm[bi, Nk - Nq + i * S: Nk - Nq + i * S + S].any()):
                    continue  # rows without a real query vote for nothing
                js = [j for j in range(nk_r) if j <= i + shift and j * S < Nk
                      and (kpm is None or kpm[bi, j * S: j * S + S].any())]
                if not js:
                    continue
                e = torch.tensor([A[i, j] / (math.sqrt(D) * S) for j in js], dtype=torch.float64)
                P[i, js] = torch.softmax(e, 0)
            r = b // S
            Wt = torch.zeros(nqb, nkb, dtype=torch.float64)
            for I in range(nqb):
                for J in range(nkb):
                    Wt[I, J] = P[I * r:(I + 1) * r, J * r:(J + 1) * r].sum()
            for I in range(nqb):
                last = (min((I + 1) * b, Nq) - 1 + Nk - Nq) // b
                forced = {0, last}
                sel = set(forced)
                mass = sum(float(Wt[I, J]) for J in forced)
                target = tau[h] * float(Wt[I].sum())
                others = sorted((J for J in range(last + 1) if J not in forced),
                                key=lambda J: (-float(Wt[I, J]), J))
                for J in others:
                    if mass < target or tau[h] >= 1:
                        sel.add(J)
                    mass += float(Wt[I, J])
                out[bi, h, I, sorted(sel)] = True
    return out


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,S,b,tau", [
    (2, 4, 2, 96, 96, 4, 16, 0.9),
    (1, 3, 1, 70, 100, 4, 16, 0.7),  # chunked prefill, lengths not multiples of the block
    (2, 2, 2, 64, 64, 8, 16, [0.5, 1.0]),  # per-head thresholds
])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_xattention_matches_slow_reference(B, Hq, Hkv, Nq, Nk, S, b, tau, pad):
    q, k = _qk(B, Hq, Hkv, Nq, Nk, 8, seed=Nq)
    kpm = padding_mask(B, Nk, pad)
    sel = attnzoo.create("selector", {"name": "xattention", "threshold": tau, "stride": S,
                                      "block_size": b, "chunk_size": 2 * b})
    plan = sel(q, k, Context(key_padding_mask=kpm))
    taus = tau if isinstance(tau, list) else [tau] * Hq
    expected = xattention_slow(q, k, taus, S, b, kpm)
    assert torch.equal(plan.to_block_mask(), expected)


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

def streaming_slow(Nq, Nk, sink, local, b):
    out = torch.zeros(-(-Nq // b), -(-Nk // b), dtype=torch.bool)
    for I in range(out.shape[0]):
        first = I * b + Nk - Nq
        last = min((I + 1) * b, Nq) - 1 + Nk - Nq
        for pos in list(range(0, min(sink, last + 1))) + list(range(max(0, first - local), last + 1)):
            out[I, pos // b] = True
    return out


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

def topk_slow(q, k, b, top_k):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    nqb, nkb = -(-Nq // b), -(-Nk // b)
    out = torch.zeros(B, Hkv, nqb, nkb, dtype=torch.bool)
    for bi in range(B):
        for hk in range(Hkv):
            kmean = [k[bi, hk, J * b:(J + 1) * b].mean(0) for J in range(nkb)]
            for I in range(nqb):
                first = I * b + Nk - Nq
                last_pos = min((I + 1) * b, Nq) - 1 + Nk - Nq
                past = [J for J in range(nkb) if (J + 1) * b - 1 <= first and (J + 1) * b <= Nk]
                own = [J for J in range(nkb) if J * b <= last_pos and J not in past]
                score = {J: 0.0 for J in past}
                for h in range(hk * g, (hk + 1) * g):
                    for i in range(I * b, min((I + 1) * b, Nq)):
                        if not past:
                            break
                        e = torch.tensor([float(q[bi, h, i] @ kmean[J]) / math.sqrt(D) for J in past])
                        for J, p in zip(past, torch.softmax(e, 0).tolist(), strict=True):
                            score[J] += p
                n_pick = max(0, top_k - len(own))
                picked = sorted(past, key=lambda J: (-score[J], J))[:n_pick]
                out[bi, hk, I, own + picked] = True
    return out


@pytest.mark.parametrize("Nq,Nk,b,top_k", [(128, 128, 16, 3), (50, 130, 16, 4), (64, 64, 8, 1)])
def test_topk_blocks_matches_slow_reference(Nq, Nk, b, top_k):
    q, k = _qk(2, 4, 2, Nq, Nk, 8, seed=Nk)
    sel = attnzoo.create("selector", {"name": "topk_blocks", "block_size": b, "top_k": top_k, "chunk_size": 2 * b})
    plan = sel(q, k)
    assert plan.heads == 2, "shared across the GQA group"
    assert torch.equal(plan.to_block_mask(), topk_slow(q, k, b, top_k))
    assert int(plan.kv_counts.max()) <= max(top_k, 2)


@pytest.mark.parametrize("spec,match", [({"top_k": 0}, "top_k must be an integer >= 1"),
                                        ({"block_size": 12}, "power of two")])
def test_topk_bad_config(spec, match):
    with pytest.raises(ValueError, match=match):
        attnzoo.create("selector", {"name": "topk_blocks", **spec})


# -- token coverage ------------------------------------------------------------------------------

def token_coverage_slow(q, k, tau, W, min_tokens, kernel):
    """One sequence (batch 0), per query head; fp64 loops over heads and tokens."""
    _, Hq, N, D = q.shape
    g = Hq // k.shape[1]
    P = N - W
    a = torch.zeros(Hq, N, dtype=torch.float64)
    for h in range(Hq):
        for i in range(N - W, N):
            s = torch.tensor([float(q[0, h, i] @ k[0, h // g, j]) / math.sqrt(D) for j in range(i + 1)])
            a[h, : i + 1] += torch.softmax(s, 0) / W
    sm = torch.zeros_like(a)
    for h in range(Hq):
        for j in range(N):
            sm[h, j] = sum(a[h, t] for t in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= t < N) / kernel
    sm = sm[:, :P]
    s = sm / sm.sum(-1, keepdim=True)
    gl = sm.mean(0) / sm.mean(0).sum()
    total, n = 0.0, 0
    for x in sorted(gl.tolist()):
        total += x
        if total < tau:
            n += 1
    if n == 0:
        return None
    K = max(min_tokens, P - (n + 1))
    keep = torch.zeros(Hq, N, dtype=torch.bool)
    for h in range(Hq):
        keep[h, sorted(range(P), key=lambda j: -float(s[h, j]))[:K]] = True
    keep[:, P:] = True
    return keep


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
    plan = sel(min_tokens=20, coverage=0.3)(q, k, Context(key_padding_mask=kpm))
    assert isinstance(plan, TokenPlan)
    assert not (plan.keep_mask() & ~kpm[:, None]).any(), "padding is never kept"
    per_kv = sel(min_tokens=20, coverage=0.3, per_kv_head=True)(q, k)
    assert per_kv.heads == 2
    # batch elements are independent
    alone = sel(min_tokens=20, coverage=0.3)(q[1:], k[1:], Context(key_padding_mask=kpm[1:]))
    assert torch.equal(alone.keep_mask()[0], plan.keep_mask()[1])


@pytest.mark.parametrize("spec,match", [({"coverage": 0.0}, "coverage must lie in"),
                                        ({"window": 0}, "window must be > 0"),
                                        ({"min_tokens": -1}, "min_tokens must be >= 0"),
                                        ({"pool_kernel": 4}, "odd")])
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
