"""Slow, obviously-correct references of the shipped selectors: loops written straight from each
method's description (fp64 where scores are involved), beside the fast code the way
flash-linear-attention keeps ``naive.py`` beside each kernel. The tests compare every selector
with its reference; a user who adds or changes a method can do the same.

Each returns the boolean selection the method's plan must equal (``plan.to_block_mask()`` or a
token keep mask). They are O(N^2) Python loops: for sequences of a few hundred tokens.
"""

from __future__ import annotations

import math

import torch

from ..plans.geometry import cdiv

__all__ = ["xattention_slow", "streaming_slow", "topk_slow", "token_coverage_slow", "quest_slow"]


def xattention_slow(q, k, tau, S, b, kpm=None, dense_tail=0):
    """XAttention block selection ``[B, Hq, Nqb, Nkb]`` from loops over reduced rows and columns:
    antidiagonal sums, causal softmax per reduced row, block sums, then the threshold rule with the
    sink and diagonal blocks forced (fp64). ``tau``: one threshold per query head. Query blocks
    holding one of a sequence's last ``dense_tail`` real tokens keep every visible block."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
    nq_r, nk_r = nqb * b // S, nkb * b // S
    shift = (Nk - Nq + S - 1) // S
    out = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool)
    for bi in range(B):
        real = [p for p in range(Nk) if kpm is None or kpm[bi, p]]
        tail = set(real[-dense_tail:]) if dense_tail and real else set()  # key positions
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
                in_tail = any(i + Nk - Nq in tail for i in range(I * b, min((I + 1) * b, Nq)))
                for J in others:
                    if mass < target or tau[h] >= 1 or in_tail:
                        sel.add(J)
                    mass += float(Wt[I, J])
                out[bi, h, I, sorted(sel)] = True
    return out


def streaming_slow(Nq, Nk, sink, local, b):
    """Streaming blocks ``[Nqb, Nkb]``: a query block keeps the blocks of the first ``sink`` keys
    and of the ``local`` keys before it, and its own."""
    out = torch.zeros(cdiv(Nq, b), cdiv(Nk, b), dtype=torch.bool)
    for I in range(out.shape[0]):
        first = I * b + Nk - Nq
        last = min((I + 1) * b, Nq) - 1 + Nk - Nq
        for pos in list(range(0, min(sink, last + 1))) + list(range(max(0, first - local), last + 1)):
            out[I, pos // b] = True
    return out


def topk_slow(q, k, b, top_k, sink=0, local=0):
    """Top-k blocks ``[B, Hkv, Nqb, Nkb]``: softmax of each query against mean-pooled past key
    blocks, summed over the block and the GQA group; the ``top_k`` best past blocks (fewer by the
    own blocks kept), ties to the lower block; besides them the past blocks of the first ``sink``
    tokens and of the ``local`` tokens before the own blocks."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
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
                forced = [J for J in past if J < cdiv(sink, b) or J >= len(past) - cdiv(local, b)]
                n_pick = max(0, top_k - len(own))
                picked = sorted((J for J in past if J not in forced), key=lambda J: (-score[J], J))[:n_pick]
                out[bi, hk, I, own + forced + picked] = True
    return out


def token_coverage_slow(q, k, tau, W, min_tokens, kernel, max_keep=None):
    """One sequence (batch 0), per query head; fp64 loops over heads and tokens. ``max_keep``: each
    head keeps at most max(min_tokens, ceil(max_keep * P)) prefix tokens, dense layers included."""
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
    K = P if n == 0 else max(min_tokens, P - (n + 1))
    if max_keep is not None:
        K = min(K, max(min_tokens, math.ceil(max_keep * P)))
    if K >= P:
        return None
    keep = torch.zeros(Hq, N, dtype=torch.bool)
    for h in range(Hq):
        keep[h, sorted(range(P), key=lambda j: -float(s[h, j]))[:K]] = True
    keep[:, P:] = True
    return keep


def quest_slow(q, k, page, budget, per_kv_head=False):
    """Quest's page choice ``[B, Hq, Nqb, pages]`` from loops (fp64, no padding): each page's
    element-wise key min and max, each query block's best upper bound per page over its queries,
    then the first page, the block's own last visible page and the highest bounds up to
    ``budget // page`` pages. ``per_kv_head``: ``[B, Hkv, ...]``, the best bound over the group's
    query heads too."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g, n_pages, nqb, pick = Hq // Hkv, cdiv(Nk, page), cdiv(Nq, page), budget // page
    out = torch.zeros(B, Hkv if per_kv_head else Hq, nqb, n_pages, dtype=torch.bool)
    for b in range(B):
        for h in range(out.shape[1]):
            kv = h if per_kv_head else h // g
            heads = range(h * g, (h + 1) * g) if per_kv_head else [h]
            pages = [k[b, kv, j * page:(j + 1) * page].double() for j in range(n_pages)]
            lo, hi = [x.min(0).values for x in pages], [x.max(0).values for x in pages]
            for i in range(nqb):
                rows = [(hq, r) for hq in heads for r in range(i * page, min((i + 1) * page, Nq))]
                last = ((min((i + 1) * page, Nq) - 1) + Nk - Nq) // page
                bound = {j: max(float(sum(max(float(q[b, hq, r, d]) * float(lo[j][d]),
                                              float(q[b, hq, r, d]) * float(hi[j][d])) for d in range(D)))
                                for hq, r in rows) for j in range(last + 1)}
                chosen = {0, last}
                for j in sorted(bound, key=lambda j: -bound[j]):
                    if len(chosen) >= pick:
                        break
                    chosen.add(j)
                for j in chosen:
                    out[b, h, i, j] = True
    return out
