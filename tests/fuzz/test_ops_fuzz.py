"""Every registered backend of every op, forced in turn in one process, against the fp32 reference.

Random shapes (batch, GQA, ragged lengths, decode, chunked prefill, non-causal), padding (none,
left, right, holes; whole sequences padded), memory layouts (transposed or strided head dim,
sequence-major, expanded batch) and dtypes; gradients in fp32 where the backend claims backward.
A backend that declines a drawn case (capability, not a bug) is counted as declined; a test whose
backend declined every case fails (tests/fuzz/conftest.py). On the CPU (profiles ``ci`` and ``long``)
Triton runs under its interpreter; the ``gpu`` profile forces every CUDA backend in turn on the GPU,
with head dims up to 128 and longer sequences.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnzoo import ops
from attnzoo.ops import dispatch, token_sparse
from attnzoo.ops.antidiagonal import antidiagonal_block_scores
from attnzoo.ops.dispatch import make_request
from attnzoo.ops.pooled import pooled_block_scores

from ..conftest import assert_lse_close, rel_err, reset_flex
from .conftest import DEVICE, capped, count, declined, examples
from .strategies import block_plans, mixed_plans, problems, token_plans

# what the GPU profile draws beyond the CPU's: the head dims models use, sequences past a few blocks
GPU_SIZES = dict(max_n=700, head_dims=(64, 128))


@pytest.fixture(scope="module", autouse=True)
def _fresh_flex():
    """The flex target drives compiled flex past dynamo's recompile limit on purpose; leave the
    process as it was so later flex tests run instead of skipping."""
    reset_flex()
    yield
    reset_flex()


def _backends(op):
    """Backends that run on the profile's device here (on the CPU, Triton under its interpreter;
    FlashInfer where it is installed, on CUDA)."""
    out = []
    for b in dispatch.backends(op):
        if b.available() is None and DEVICE in b.devices and (b.device_check is None or
                                                              b.device_check(DEVICE) is None):
            out.append(pytest.param(b, id=b.name))
    return out


def _leaves(p, grad):
    return [t.detach().requires_grad_(grad) for t in (p.q, p.k, p.v)]


def _compare(target, backend, p, run, plan, grad, lse_claimed=True, rows=None):
    """``run(q, k, v) -> (out, lse | None)`` against ``ops.reference`` under ``plan``; ``rows``
    ``[B, Hq, Nq]`` bool: only these rows are compared (the others' output is unspecified)."""
    tol = backend.tolerance(p.q.dtype)
    q, k, v = _leaves(p, grad)
    out, lse = run(q, k, v)
    qr, kr, vr = (t.detach().float().requires_grad_(grad) for t in (p.q, p.k, p.v))
    ref, ref_lse = ops.reference(qr, kr, vr, plan, causal=p.causal, key_padding_mask=p.kpm, return_lse=True)
    if rows is not None:
        out, ref = out * rows[..., None], ref * rows[..., None]
        ref_lse = ref_lse.masked_fill(~rows, float("-inf"))
        lse = None if lse is None else lse.masked_fill(~rows, float("-inf"))
    count(target)
    assert out.shape == p.q.shape and out.dtype == p.q.dtype
    assert torch.isfinite(out).all(), "non-finite output"
    assert rel_err(out, ref) <= tol.out or ref.abs().max() == 0, f"out rel err {rel_err(out, ref):.2e}"
    if lse is not None:
        assert_lse_close(lse, ref_lse, tol.lse)
    if grad:
        g = torch.Generator().manual_seed(7)
        dout = torch.randn(out.shape, generator=g).to(out.device)
        fin = torch.isfinite(ref_lse)
        dlse = torch.randn(ref_lse.shape, generator=g).to(out.device) * fin
        loss = (out.float() * dout).sum() + ((lse.where(fin, 0.0) * dlse).sum() if lse is not None else 0)
        ref_loss = (ref * dout).sum() + ((ref_lse.where(fin, 0.0) * dlse).sum() if lse is not None else 0)
        loss.backward()
        ref_loss.backward()
        for name, a, b in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            assert torch.isfinite(a).all(), f"non-finite {name}"
            assert rel_err(a, b) <= tol.grad or b.abs().max() == 0, f"{name} rel err {rel_err(a, b):.2e}"


def _takes(backend, req, target) -> bool:
    if capped(target, backend.name):
        return False
    if backend.why_not(req, forced=True) is None:
        return True
    declined(target)
    return False


def _sizes(backend, **cpu) -> dict:
    """``problems`` arguments: on the GPU its sizes; on the CPU ``cpu``, and for Triton (its
    interpreter runs ms per tile) smaller problems at its tile sizes."""
    decode = backend is not None and backend.name == "triton_decode"  # it takes one query per head only
    grouped = dict(groups=(2, 3, 4), prefill=True)  # what triton_grouped takes: GQA prefills
    if DEVICE == "cuda":
        if backend is not None and backend.name == "sdpa_cuda":  # what it declares: padding at decode only
            return dict(GPU_SIZES, device=DEVICE, allow_padding=False)
        if backend is not None and backend.name == "triton_grouped":
            return dict(GPU_SIZES, device=DEVICE, **grouped)
        return dict(GPU_SIZES, device=DEVICE, decode=decode)
    if decode:  # a long cache: the merge of several shares per row
        return dict(max_n=400, head_dims=(16, 32), decode=True)
    if backend is not None and backend.name in ("triton", "triton_rows"):
        return dict(max_n=96, head_dims=(16, 32))
    if backend is not None and backend.name == "triton_grouped":
        return dict(max_n=96, head_dims=(16, 32), **grouped)
    if backend is not None and backend.name == "flex":  # what it declares: no padding, fp32/bf16, kv >= a block
        return dict(cpu, allow_padding=False, dtypes=(torch.float32, torch.bfloat16), min_nk=64)
    return cpu


def _grad(p, backend, data) -> bool:
    """Gradients where the backend claims them: fp32 on the CPU; fp32 and bf16 on the GPU (the
    backend matrix's dtypes; fp16 gradients overflow the reference's tolerances)."""
    dtypes = (torch.float32, torch.bfloat16) if DEVICE == "cuda" else (torch.float32,)
    return p.q.dtype in dtypes and backend.backward and data.draw(st.booleans())


@pytest.mark.parametrize("backend", _backends("dense"))
@given(data=st.data())
@examples(ci=12, long=3000, gpu=600)
def test_dense_backend(backend, data):
    # a backend skipping rows past each head's row_lengths serves causal self-attention naming them
    sizes = dict(_sizes(backend), causal=True, square=True) if backend.row_lengths else _sizes(backend)
    p = data.draw(problems(**sizes))
    grad = _grad(p, backend, data)
    target = f"dense/{backend.name}"
    rows, kw = None, {}
    if backend.row_lengths:
        B, Hq, Hkv, N = p.q.shape[0], p.q.shape[1], p.k.shape[1], p.q.shape[2]
        H = data.draw(st.sampled_from([Hq, Hkv]))
        lengths = torch.tensor(data.draw(st.lists(st.integers(0, N), min_size=B * H, max_size=B * H))).view(B, H)
        kw = {"row_lengths": lengths.to(p.q.device)}
        rows = torch.arange(N, device=p.q.device) < kw["row_lengths"].repeat_interleave(Hq // H, 1)[..., None]
    req = make_request("dense", p.q.detach().requires_grad_(grad), p.k, p.v, "dense", return_lse=backend.lse,
                       key_padding_mask=p.kpm, causal=p.causal, row_lengths=rows is not None)
    if not _takes(backend, req, target):
        return

    def run(q, k, v):
        res = ops.dense(q, k, v, causal=p.causal, key_padding_mask=p.kpm, return_lse=backend.lse,
                        backend=backend.name, **kw)
        return res if backend.lse else (res, None)

    _compare(target, backend, p, run, None, grad, rows=rows)


def _block_case(data, backend):
    p = data.draw(problems(**_sizes(backend)))
    if backend.name == "triton_grouped":  # plans a GQA group shares, its rows in one 128-row tile
        return p, data.draw(block_plans(p, blocks=(16, 32), per_head="kv"))
    if backend.name.startswith("triton"):
        blocks = (16, 32, 64, 128) if DEVICE == "cuda" else (16, 32, 64)
    else:
        blocks = (16, 32, 64, 128) if DEVICE == "cuda" else (1, 4, 16, 32, 64)
    plan = data.draw(block_plans(p, blocks=blocks))
    return p, plan


@pytest.mark.parametrize("backend", _backends("block_sparse"))
@given(data=st.data())
@examples(ci=12, long=3000, gpu=700)
def test_block_sparse_backend(backend, data):
    p, plan = _block_case(data, backend)
    grad = _grad(p, backend, data)
    target = f"block_sparse/{backend.name}"
    req = make_request("block_sparse", p.q.detach().requires_grad_(grad), p.k, p.v, "block",
                       return_lse=backend.lse, key_padding_mask=p.kpm, causal=plan.causal, plan_heads=plan.heads,
                       plan_density=plan.density(), block_size=(plan.block_q, plan.block_k))
    if not _takes(backend, req, target):
        return

    def run(q, k, v):
        try:
            res = ops.block_sparse(q, k, v, plan, key_padding_mask=p.kpm, return_lse=backend.lse,
                                   backend=backend.name)
        except dispatch.NoBackendError as e:
            # compiled flex stops after a compile failure (e.g. dynamo's recompile limit) and says so
            assert backend.name == "flex" and "failed earlier in this process" in str(e), str(e)
            declined(target)
            return None, None
        return res if backend.lse else (res, None)

    if backend.name == "flex":  # one call: a compile failure disables flex for the next one
        first = run(p.q, p.k, p.v)
        if first[0] is None:
            return
        _compare(target, backend, p, lambda q, k, v: first, plan, grad)
        return
    _compare(target, backend, p, run, plan, grad)


@pytest.mark.parametrize("backend", _backends("mixed"))
@given(data=st.data())
@examples(ci=8, long=1000, gpu=400)
def test_mixed_backend(backend, data):
    p = data.draw(problems(causal=True, **_sizes(backend, head_dims=(16, 32))))
    plan = data.draw(mixed_plans(p))
    grad = _grad(p, backend, data)
    target = f"mixed/{backend.name}"
    req = make_request("mixed", p.q.detach().requires_grad_(grad), p.k, p.v, "mixed", return_lse=True,
                       key_padding_mask=p.kpm, causal=True, plan_heads=plan.heads,
                       block_size=(plan.block_size, plan.block_size))
    if not _takes(backend, req, target):
        return
    run = lambda q, k, v: ops.mixed(q, k, v, plan, key_padding_mask=p.kpm, return_lse=True, backend=backend.name)
    _compare(target, backend, p, run, plan.to_block_plan(), grad)


@given(data=st.data())
@examples(ci=12, long=1000, gpu=250)
def test_token_sparse_attention(data):
    p = data.draw(problems(causal=True, square=True, **_sizes(None)))  # a token plan is a prefill plan
    plan = data.draw(token_plans(p))
    backend = dispatch.choose(make_request("dense", p.q, p.k, p.v, "dense", return_lse=True, key_padding_mask=None,
                                           causal=True))
    grad = _grad(p, backend, data)
    run = lambda q, k, v: token_sparse.attention(q, k, v, plan, key_padding_mask=p.kpm, return_lse=True)
    # reference: kept queries attend causally to kept keys of their head; dropped rows are zeros
    _compare("token_sparse", backend, p, run, plan, grad)


def _fp64_scores(q, k, kpm, stride, block, chunk):
    parts = antidiagonal_block_scores(q.double(), k.double(), stride=stride, block_size=block, chunk_size=chunk,
                                      key_padding_mask=kpm, backend="torch")
    return torch.cat([w for _, _, w in parts], dim=2)


@pytest.mark.parametrize("backend", _backends("antidiagonal_scores"))
@given(data=st.data())
@examples(ci=8, long=500, gpu=250)
def test_antidiagonal_scores_backend(backend, data):
    p = data.draw(problems(causal=True, **_sizes(backend, head_dims=(16, 32))))
    block = data.draw(st.sampled_from([16, 32, 64]))
    stride = data.draw(st.sampled_from([s for s in (2, 4, 8, 16) if block % s == 0 and s < block]))
    chunk = block * data.draw(st.integers(1, 4))
    target = f"antidiagonal_scores/{backend.name}"
    req = make_request("antidiagonal_scores", p.q, p.k, p.k, "scores", return_lse=False, key_padding_mask=p.kpm,
                       causal=True, block_size=(block, block), stride=stride)
    if not _takes(backend, req, target):
        return
    q = p.q.detach().requires_grad_(data.draw(st.booleans()))  # scores never need (or build) a graph
    w = torch.cat([w for _, _, w in antidiagonal_block_scores(q, p.k, stride=stride, block_size=block,
                                                              chunk_size=chunk, key_padding_mask=p.kpm,
                                                              backend=backend.name)], dim=2)
    ref = _fp64_scores(p.q, p.k, p.kpm, stride, block, chunk)
    count(target)
    assert not w.requires_grad
    tol = backend.tolerance(p.q.dtype).out if p.q.dtype != torch.float32 else 1e-4
    assert w.shape == ref.shape
    assert rel_err(w, ref) <= max(tol, 1e-4) or ref.abs().max() == 0, f"rel err {rel_err(w, ref):.2e}"


@pytest.mark.parametrize("backend", _backends("pooled_scores"))
@given(data=st.data())
@examples(ci=8, long=500, gpu=250)
def test_pooled_scores_backend(backend, data):
    """Top-k blocks' scores (q against each key block's mean key) against the torch scorer in fp64."""
    p = data.draw(problems(causal=True, **_sizes(backend, head_dims=(16, 32))))
    block = data.draw(st.sampled_from([16, 32, 64]))
    chunk = block * data.draw(st.integers(1, 4))
    masked = data.draw(st.booleans())
    target = f"pooled_scores/{backend.name}"
    req = make_request("pooled_scores", p.q, p.k, p.k, "scores", return_lse=False, key_padding_mask=p.kpm,
                       causal=True, block_size=(block, block))
    if not _takes(backend, req, target):
        return
    kw = dict(block_size=block, chunk_size=chunk, key_padding_mask=p.kpm, masked=masked)
    w = pooled_block_scores(p.q, p.k, backend=backend.name, **kw)
    ref = pooled_block_scores(p.q.double(), p.k.double(), backend="torch", **kw)
    count(target)
    tol = backend.tolerance(p.q.dtype).out if p.q.dtype != torch.float32 else 1e-4
    assert w.shape == ref.shape
    assert rel_err(w, ref) <= max(tol, 1e-4) or ref.abs().max() == 0, f"rel err {rel_err(w, ref):.2e}"


@pytest.mark.parametrize("backend", _backends("page_scores"))
@given(data=st.data())
@examples(ci=8, long=500, gpu=250)
def test_page_scores_backend(backend, data):
    """Quest's decode page scores: the last page's bounds updated in place exactly as the torch
    reference does (min / max of the real keys), the same pages ranked (-1 for the own page and pages
    of padding, the sink key for the sink and the local window), keys equal up to fp32 summation order."""
    from attnzoo.ops import pages
    from attnzoo.selectors.quest import Quest

    p = data.draw(problems(decode=True, **_sizes(backend, max_n=400, head_dims=(16, 32, 64))))
    page = data.draw(st.sampled_from([16, 32]))
    Nk = p.k.shape[2]
    n_pages = -(-Nk // page)
    if n_pages < 2:
        return
    forced_lo = data.draw(st.integers(max(0, n_pages - 4), n_pages - 1))
    per_kv_head = data.draw(st.booleans())  # a GQA group's best bound per page (Quest's per_kv_head)
    target = f"page_scores/{backend.name}"
    req = make_request("page_scores", p.q, p.k, p.k, "scores", return_lse=False, key_padding_mask=p.kpm,
                       causal=False, block_size=(page, page))
    if not _takes(backend, req, target):
        return
    kpm = p.kpm
    lo0, hi0 = Quest(page_size=page, budget=2 * page).decode_bounds(p.k, kpm)
    got, ref = {}, {}
    for name, out in ((backend.name, got), ("torch", ref)):
        lo, hi = lo0.clone(), hi0.clone()
        out["s"] = pages.page_scores(p.q, lo, hi, n_pages=n_pages, forced_lo=forced_lo, page_size=page, k=p.k,
                                     key_padding_mask=kpm, per_kv_head=per_kv_head, backend=name)
        out["lo"], out["hi"] = lo[:, :, :n_pages], hi[:, :, :n_pages]
    count(target)
    assert torch.equal(got["lo"], ref["lo"]) and torch.equal(got["hi"], ref["hi"])
    s1, s2 = got["s"], ref["s"]
    assert torch.equal(s1 < 0, s2 < 0) and torch.equal(s1 == pages.SINK_SCORE, s2 == pages.SINK_SCORE)
    assert (s1.view(torch.int32).long() - s2.view(torch.int32).long()).abs().max() <= 256
