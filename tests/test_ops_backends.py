"""Every registered dense / block-sparse backend against the fp32 reference.

Output, lse and (where the backend claims backward) gradients, with the per-dtype tolerances
the backend declares. Cases cover batch > 1, GQA 1/3/4, lengths that are not multiples of
the block, Nq < Nk (chunked prefill, decode), left/right padding and rows with no visible key.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attnzoo import ops
from attnzoo.ops import dispatch
from attnzoo.ops.dispatch import NoBackendError

from .conftest import assert_lse_close, make_qkv, padding_mask, random_block_plan, rel_err


@dataclass(frozen=True)
class Case:
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    pad: str = "none"
    causal: bool = True

    def __str__(self):
        c = "" if self.causal else "-noncausal"
        return f"B{self.B}-H{self.Hq}:{self.Hkv}-N{self.Nq}x{self.Nk}-D{self.D}-pad{self.pad}{c}"


CASES = [
    Case(1, 4, 4, 1000, 1000, 64),
    Case(3, 6, 2, 1023, 1023, 32, "right"),
    Case(3, 12, 3, 1000, 1000, 64, "left"),  # left padding: early rows see no real key
    Case(2, 8, 2, 200, 1023, 64, "right"),  # chunked prefill
    Case(3, 4, 1, 1, 1000, 64, "left"),  # decode
    Case(2, 3, 3, 300, 500, 32, "right", causal=False),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _devices():
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs CUDA"))]


def _inputs(case: Case, dtype, device, grad):
    q, k, v = make_qkv(case.B, case.Hq, case.Hkv, case.Nq, case.Nk, case.D, dtype, seed=hash(str(case)) % 1000)
    q, k, v = (t.to(device).requires_grad_(grad) for t in (q, k, v))
    kpm = padding_mask(case.B, case.Nk, case.pad)
    return q, k, v, (kpm.to(device) if kpm is not None else None)


# (op, backend, device) -> [cases compared, cases declined] over this module's matrix
TALLY: dict[tuple[str, str, str], list[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def every_backend_compared_something():
    """After the matrix: a backend that declined every case it was given compared nothing, and the
    matrix would read as skips; that is an error here."""
    yield
    usable = {(b.op, b.name, dev) for b in dispatch.backends() for dev in b.devices if b.available() is None
              and (b.device_check is None or b.device_check(dev) is None)}  # installed, and runs there
    silent = [f"{op}/{name} on {dev} ({declined} declined)" for (op, name, dev), (compared, declined)
              in TALLY.items() if declined and not compared and (op, name, dev) in usable]
    assert not silent, f"backends that declined every case and compared none: {silent}"


def _declares(backend, q, dtype, grad, kpm) -> bool:
    """Whether ``backend``'s declared capabilities cover this call with no request-specific limit
    (``check``) of its own: then a decline is a regression, not a capability gap."""
    dev = q.device.type
    return (backend.available() is None and dev in backend.devices
            and (backend.device_check is None or backend.device_check(dev) is None)
            and dtype in backend.dtypes and (backend.head_dims is None or q.shape[-1] in backend.head_dims)
            and (not grad or backend.backward) and (kpm is None or backend.padding) and backend.check is None)


def _check(run, q, k, v, kpm, plan, backend, dtype, grad):
    """Run ``run`` (returns out, lse) and the reference; compare with declared tolerances. A decline
    is a skip only where the backend declares it cannot take the call; otherwise it fails."""
    if backend.devices == ("cuda",) and q.device.type == "cpu":
        pytest.skip("needs CUDA")
    if backend.name in ("triton", "triton_rows") and q.device.type == "cpu":
        pytest.skip("Triton on CPU runs under the interpreter in tests/test_kernels.py (small shapes)")
    tol = backend.tolerance(dtype)
    tally = TALLY.setdefault((backend.op, backend.name, q.device.type), [0, 0])
    try:
        out, lse = run(q, k, v)
    except NoBackendError as e:
        tally[1] += 1
        if _declares(backend, q, dtype, grad, kpm):
            pytest.fail(f"{backend.op}/{backend.name} declined a call its declared capabilities cover: {e}")
        pytest.skip(str(e))
    tally[0] += 1
    qr, kr, vr = (t.detach().float().requires_grad_(grad) for t in (q, k, v))
    ref, ref_lse = ops.reference(qr, kr, vr, plan, key_padding_mask=kpm, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol.out, f"out rel err {rel_err(out, ref):.2e} > {tol.out}"
    if lse is not None:
        assert lse.dtype == torch.float32
        assert_lse_close(lse, ref_lse, tol.lse)
    if grad:
        g = torch.Generator().manual_seed(1)
        dout = torch.randn(out.shape, generator=g).to(out.device)  # drawn on the CPU: same values anywhere
        dlse = torch.randn(ref_lse.shape, generator=g).to(out.device)
        fin = torch.isfinite(ref_lse)
        if lse is None:  # a backend without lse (sdpa_cuda): the output's gradient alone
            dlse = torch.zeros_like(dlse)
            lse = ref_lse.detach()
        loss = (out.float() * dout).sum() + (lse.where(fin, 0.0) * dlse).sum()
        ref_loss = (ref * dout).sum() + (ref_lse.where(fin, 0.0) * dlse).sum()
        loss.backward()
        ref_loss.backward()
        for name, a, b in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            assert a.dtype == q.dtype
            assert rel_err(a, b) <= tol.grad, f"{name} rel err {rel_err(a, b):.2e} > {tol.grad}"


def _backend_params(op):
    return [pytest.param(b, id=b.name) for b in dispatch.backends(op)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", _backend_params("dense"))
def test_dense_backend_matches_reference(backend, case, dtype, device):
    grad = backend.backward and dtype != torch.float16
    q, k, v, kpm = _inputs(case, dtype, device, grad)
    rows = {}
    if backend.row_lengths:  # a backend serving calls that name each head's real rows: every row real here
        if not case.causal or case.Nq != case.Nk:
            pytest.skip("row_lengths: causal self-attention only")
        rows = {"row_lengths": torch.full((case.B, case.Hkv), case.Nq, device=device)}
    run = lambda q, k, v: ops.dense(q, k, v, causal=case.causal, key_padding_mask=kpm,
                                    return_lse=backend.lse, backend=backend.name, **rows)
    wrapped = (lambda q, k, v: run(q, k, v)) if backend.lse else (lambda q, k, v: (run(q, k, v), None))
    from attnzoo.plans import DensePlan
    _check(wrapped, q, k, v, kpm, DensePlan(case.Nq, case.Nk, case.causal), backend, dtype, grad)


BLOCKS = [(64, 64), (32, 64), (128, 32)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["plan-per-qhead", "plan-per-kvhead"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", [b for b in _backend_params("block_sparse") if b.id != "flex"])
def test_block_sparse_backend_matches_reference(backend, case, per_kv_head, dtype, device):
    grad = backend.backward and dtype != torch.float16
    q, k, v, kpm = _inputs(case, dtype, device, grad)
    bq, bk = BLOCKS[(case.Nq + case.Hq) % len(BLOCKS)]
    H = case.Hkv if per_kv_head else case.Hq
    plan = random_block_plan(case.B, H, case.Nq, case.Nk, bq, bk, p=0.4, seed=case.Nk, causal=case.causal)
    plan = type(plan)(plan.kv_indices.to(device), plan.kv_counts.to(device), bq, bk, case.Nq,
                      case.Nk, case.causal)
    lse_ok = backend.lse
    run = lambda q, k, v: (ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=lse_ok,
                                            backend=backend.name) if lse_ok else
                           (ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, backend=backend.name), None))
    _check(run, q, k, v, kpm, plan, backend, dtype, grad)


# The compiled flex backend: inference only, no padding; one compile per process, so a
# handful of shapes (dynamic=True avoids a recompile per length).
FLEX_CASES = [Case(1, 4, 4, 1000, 1000, 64), Case(2, 8, 2, 200, 1023, 64),
              Case(3, 12, 3, 1023, 1023, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FLEX_CASES, ids=str)
def test_flex_backend_matches_reference(case, dtype):
    backend = next(b for b in dispatch.backends("block_sparse") if b.name == "flex")
    if backend.available():
        pytest.skip(backend.available())
    q, k, v, _ = _inputs(case, dtype, "cpu", False)
    plan = random_block_plan(case.B, case.Hkv, case.Nq, case.Nk, 64, 64, p=0.3, seed=3)
    _check(lambda q, k, v: (ops.block_sparse(q, k, v, plan, backend="flex"), None), q, k, v, None,
           plan, backend, dtype, False)


def test_full_block_plan_equals_dense():
    """A plan that selects every causal block is dense attention."""
    from attnzoo.plans import BlockPlan

    q, k, v = make_qkv(2, 6, 2, 333, 517, 32)
    plan = BlockPlan.full(2, 2, 333, 517, 64, 32)
    assert plan.density() == pytest.approx(1.0)
    a, la = ops.block_sparse(q, k, v, plan, return_lse=True)
    b, lb = ops.dense(q, k, v, return_lse=True)
    assert rel_err(a, b) <= 1e-5 and rel_err(la, lb) <= 1e-5


def test_padding_content_is_ignored():
    """Huge values at padded key positions must not leak into any output."""
    from .conftest import random_block_plan

    q, k, v = make_qkv(3, 4, 2, 300, 300, 32)
    kpm = padding_mask(3, 300, "right")
    plan = random_block_plan(3, 2, 300, 300, 64, 64, p=0.6)
    k2, v2 = k.clone(), v.clone()
    k2[~kpm[:, None, :].expand(-1, 2, -1)] = 1e4
    v2[~kpm[:, None, :].expand(-1, 2, -1)] = -1e4
    for run in (lambda k, v: ops.dense(q, k, v, key_padding_mask=kpm),
                lambda k, v: ops.block_sparse(q, k, v, plan, key_padding_mask=kpm)):
        assert torch.equal(run(k, v), run(k2, v2))


def test_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = make_qkv(2, 4, 2, 64, 64, 16, requires_grad=True)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[1, :20] = False  # rows 0..19 of batch 1 see only padding
    plan = random_block_plan(2, 4, 64, 64, 16, 16, p=1.0)
    for fn in (lambda: ops.dense(q, k, v, key_padding_mask=kpm, return_lse=True),
               lambda: ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=True)):
        out, lse = fn()
        assert torch.equal(out[1, :, :20], torch.zeros_like(out[1, :, :20]))
        assert torch.isinf(lse[1, :, :20]).all() and torch.isfinite(lse[1, :, 20:]).all()
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        for t in (q, k, v):
            t.grad = None


def test_ops_accept_hf_layout_and_match_contiguous():
    """transformers hands attention functions transposed, non-contiguous q/k/v."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 130, h, 16, generator=g).transpose(1, 2) for h in (6, 2, 2))
    kpm = padding_mask(2, 130, "left")
    plan = random_block_plan(2, 2, 130, 130, 32, 32, p=0.5)
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    for backend in ("blocked", None):
        a = ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, backend=backend)
        assert torch.equal(a, ops.block_sparse(qc, kc, vc, plan, key_padding_mask=kpm, backend=backend))
    assert rel_err(ops.dense(q, k, v, key_padding_mask=kpm), ops.dense(qc, kc, vc, key_padding_mask=kpm)) < 1e-6


def _uneven_plan(B, H, N, b, densities, seed=0):
    from attnzoo.plans import BlockPlan

    g = torch.Generator().manual_seed(seed)
    bm = BlockPlan.full(B, H, N, N, b, b).to_block_mask()
    bm &= torch.rand(bm.shape, generator=g) < torch.tensor(densities)[None, :, None, None]
    bm |= torch.eye(bm.shape[-1], dtype=torch.bool)  # the diagonal block, as every selector keeps
    return BlockPlan.from_block_mask(bm, b, b, N, N)


def test_blocked_chunks_rows_by_selection_count_and_stays_exact(setting):
    """Rows of very different lengths (a near-dense head beside sparse ones) are chunked by their
    counts, so padding stays small; out of plan order and across tiny chunks, forward, lse and
    gradients still match the reference."""
    import importlib

    bsm = importlib.import_module("attnzoo.ops.block_layout")
    plan = _uneven_plan(2, 4, 200, 16, [1.0, 0.5, 0.1, 0.05])
    q, k, v = make_qkv(2, 8, 4, 200, 200, 16, seed=5)
    setting(layout_chunk_elements=2 * 16 * 16 * 40)  # ~40 padded slots a chunk: several chunks
    lay = bsm.BlockLayout(q.shape, k.shape, plan, q.device)
    chunks = list(lay.chunks())
    rows = torch.cat([r for r, _ in chunks])
    assert sorted(rows.tolist()) == list(range(2 * 4 * plan.num_q_blocks))  # every row once
    assert rows.tolist() != sorted(rows.tolist())  # by count, not plan order, for this plan
    padded = sum(len(r) * kmax for r, kmax in chunks)
    assert padded <= 1.3 * int(plan.kv_counts.sum()), padded / int(plan.kv_counts.sum())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = ops.block_sparse(q, k, v, plan, backend="blocked", return_lse=True)
    ref, ref_lse = ops.reference(q, k, v, plan, return_lse=True)
    assert rel_err(out, ref) <= 1e-5
    assert_lse_close(lse, ref_lse, 1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, w in zip(got, want, strict=True):
        assert rel_err(a, w) <= 1e-4


def test_blocked_keeps_plan_order_for_alike_rows():
    import importlib

    bsm = importlib.import_module("attnzoo.ops.block_layout")
    from attnzoo.plans import BlockPlan

    plan = BlockPlan.full(1, 2, 256, 256, 16, 16)  # every row as long as its neighbours, in order
    q, k, _ = make_qkv(1, 2, 2, 256, 256, 16, seed=1)
    rows = torch.cat([r for r, _ in bsm.BlockLayout(q.shape, k.shape, plan, q.device).chunks()])
    assert rows.tolist() == list(range(2 * 16))


@pytest.mark.parametrize("blocks", BLOCKS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_blocked_cpu_flash_paths_match_torch_paths(case, blocks):
    """On a CPU the blocked backend's forward runs aten's flash kernel over gathered blocks, split
    into open and edge slots; the fp32 torch forward (what CUDA runs) stays the yardstick. Both
    against the reference, every case (padding, chunked prefill, decode, non-causal) and block
    shape (bq == bk, bq < bk, bq > bk), plans with empty rows and garbage in unused slots; and the
    recompute backward from the flash forward's out and lse, with gradients from out alone (the
    matrix above also feeds d(lse))."""
    import importlib

    bsm = importlib.import_module("attnzoo.ops.block_sparse")
    from attnzoo.ops.block_layout import BlockLayout

    q, k, v, kpm = _inputs(case, torch.float32, "cpu", False)
    bq, bk = blocks
    plan = random_block_plan(case.B, case.Hkv, case.Nq, case.Nk, bq, bk, p=0.3, seed=case.Nq, causal=case.causal)
    scale = case.D ** -0.5
    lay = BlockLayout(q.shape, k.shape, plan, q.device)
    ref, ref_lse = ops.reference(q, k, v, plan, key_padding_mask=kpm, return_lse=True)
    for fwd in (bsm._forward, bsm._forward_flash_cpu):
        out, lse = fwd(q, k, v, lay, kpm, scale)
        assert rel_err(out, ref) <= 1e-5, fwd.__name__
        assert_lse_close(lse, ref_lse, 1e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ops.reference(qr, kr, vr, plan, key_padding_mask=kpm), (qr, kr, vr), dout)
    got = bsm._backward(q, k, v, out, lse, dout, None, lay, kpm, scale)
    for name, a, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert rel_err(a, w) <= 1e-4, name


DIAGONAL_CASES = [
    Case(1, 4, 4, 1000, 1000, 64),  # a partial last block: its padded keys follow every real query
    Case(2, 6, 2, 256, 768, 32),  # chunked prefill with an aligned offset; plans per KV head (r = 3)
    Case(3, 6, 2, 1023, 1023, 32, "right"),  # a padding mask: the masked edge path
    Case(2, 8, 2, 200, 1023, 64),  # an offset that is not a multiple of the block: masked edges
]


@pytest.mark.parametrize("missing_diagonal", [False, True], ids=["diagonals", "one-missing"])
@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("case", DIAGONAL_CASES, ids=str)
def test_blocked_cpu_diagonal_edges_run_causal(case, block, missing_diagonal, monkeypatch):
    """Plans that keep every row's diagonal block (as the selectors do) with aligned square blocks
    and no padding mask: the CPU flash forward runs the diagonal through ``is_causal`` instead of a
    mask. Exact against the reference; taken exactly where it applies (a row without its diagonal,
    a padding mask or an unaligned offset keep the masked edge path)."""
    import importlib

    from attnzoo.ops.block_layout import BlockLayout
    from attnzoo.plans import BlockPlan

    bsm = importlib.import_module("attnzoo.ops.block_sparse")
    calls = []
    diagonal = bsm._flash_diagonal
    monkeypatch.setattr(bsm, "_flash_diagonal", lambda *a: calls.append(1) or diagonal(*a))
    q, k, v, kpm = _inputs(case, torch.float32, "cpu", False)
    g = torch.Generator().manual_seed(case.Nq + block)
    bm = BlockPlan.full(case.B, case.Hkv, case.Nq, case.Nk, block, block).to_block_mask()
    off = (case.Nk - case.Nq) // block
    diag = torch.zeros_like(bm)
    idx = torch.arange(bm.shape[2])
    diag[..., idx, (idx + off).clamp(max=bm.shape[3] - 1)] = True
    bm = (bm & (torch.rand(bm.shape, generator=g) < 0.3)) | (diag & bm)
    if missing_diagonal:
        bm[0, 0, bm.shape[2] // 2] &= ~diag[0, 0, bm.shape[2] // 2]
    plan = BlockPlan.from_block_mask(bm, block, block, case.Nq, case.Nk)
    lay = BlockLayout(q.shape, k.shape, plan, q.device)
    out, lse = bsm._forward_flash_cpu(q, k, v, lay, kpm, case.D ** -0.5)
    ref, ref_lse = ops.reference(q, k, v, plan, key_padding_mask=kpm, return_lse=True)
    assert rel_err(out, ref) <= 1e-5
    assert_lse_close(lse, ref_lse, 1e-5)
    aligned = kpm is None and (case.Nk - case.Nq) % block == 0
    if not missing_diagonal:  # (with one row missing, only that row's chunk must fall back)
        assert bool(calls) == aligned
    elif not aligned:
        assert not calls
