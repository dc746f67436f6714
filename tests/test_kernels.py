"""GPU kernels against the fp32 reference: Triton (on CUDA, or on CPU under TRITON_INTERPRET=1,
set by conftest when there is no GPU) and the FlashInfer plan conversion (CPU, with an emulator
of FlashInfer's documented gathered-causal rule; the kernels themselves need CUDA).

Shapes are small: the interpreter takes milliseconds per tile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from attnzoo import build, ops, settings
from attnzoo.ops import dispatch
from attnzoo.ops.antidiagonal import antidiagonal_block_scores
from attnzoo.ops.kernels import flashinfer_backends as fib
from attnzoo.ops.kernels._triton import tma_fits, triton_reason
from attnzoo.plans import MODES, BlockPlan, MixedPlan
from attnzoo.stack import CallContext

from .conftest import assert_lse_close, make_qkv, padding_mask, random_block_plan, rel_err
from .test_ops_backends import Case as BackendCase

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(triton_reason(DEVICE) is not None,
                                  reason=f"Triton cannot run here: {triton_reason(DEVICE)}")
TOL = {torch.float32: (1e-4, 1e-4, 1e-3), torch.bfloat16: (2e-2, 1e-2, 5e-2),
       torch.float16: (5e-3, 2e-3, 1e-2)}


@dataclass(frozen=True)
class Case(BackendCase):
    """The backend matrix's case plus the plan's block size (small shapes for the interpreter)."""

    block: tuple = (32, 32)

    def __str__(self):
        return f"{super().__str__()}-b{self.block[0]}x{self.block[1]}"


CASES = [
    Case(1, 2, 2, 64, 64, 16),
    Case(2, 4, 2, 100, 100, 32, "right"),  # GQA 2, ragged length, padding
    Case(2, 4, 1, 70, 100, 16, "left", block=(32, 16)),  # Nq < Nk, left padding, bq != bk
    Case(2, 2, 1, 1, 90, 64, "right"),  # decode
    Case(1, 3, 3, 50, 80, 32, causal=False, block=(16, 32)),
    Case(1, 2, 1, 200, 200, 16, "right", block=(128, 32)),  # tile smaller than the query block
]


def _qkv(case, dtype, grad, seed=0):
    q, k, v = make_qkv(case.B, case.Hq, case.Hkv, case.Nq, case.Nk, case.D, dtype, seed=seed)
    q, k, v = (t.to(DEVICE).requires_grad_(grad) for t in (q, k, v))
    kpm = padding_mask(case.B, case.Nk, case.pad)
    return q, k, v, None if kpm is None else kpm.to(DEVICE)


def _compare(out, lse, q, k, v, kpm, plan, dtype, grad):
    tol_out, tol_lse, tol_grad = TOL[dtype]
    qr, kr, vr = (t.detach().float().requires_grad_(grad) for t in (q, k, v))
    ref, ref_lse = ops.reference(qr, kr, vr, plan, key_padding_mask=kpm, return_lse=True)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol_out, f"out rel err {rel_err(out, ref):.2e}"
    assert_lse_close(lse, ref_lse, tol_lse)
    if not grad:
        return
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(DEVICE)
    dlse = torch.randn(ref_lse.shape, generator=g).to(DEVICE)
    fin = torch.isfinite(ref_lse)
    ((out.float() * dout).sum() + (lse.where(fin, 0.0) * dlse).sum()).backward()
    ((ref * dout).sum() + (ref_lse.where(fin, 0.0) * dlse).sum()).backward()
    for name, a, b in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert rel_err(a, b) <= tol_grad, f"{name} rel err {rel_err(a, b):.2e}"


def _plan_to(plan, device):
    return BlockPlan(plan.kv_indices.to(device), plan.kv_counts.to(device), plan.block_q, plan.block_k,
                     plan.q_len, plan.kv_len, plan.causal)


# -- Triton block-sparse ------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_block_sparse_matches_reference(case, per_kv_head, dtype):
    grad = dtype != torch.float16
    q, k, v, kpm = _qkv(case, dtype, grad, seed=case.Nk)
    H = case.Hkv if per_kv_head else case.Hq
    plan = _plan_to(random_block_plan(case.B, H, case.Nq, case.Nk, *case.block, p=0.5, seed=case.Nq,
                                      causal=case.causal), DEVICE)
    out, lse = ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=True, backend="triton")
    _compare(out, lse, q, k, v, kpm, plan, dtype, grad)


DECODE_CASES = [
    Case(3, 4, 1, 1, 1000, 64, "left", block=(16, 16)),  # Quest's pages: 16-token blocks
    Case(2, 6, 2, 1, 333, 32, "right", block=(64, 64)),  # ragged length, padding at the end
    Case(1, 2, 2, 1, 900, 16, block=(32, 128)),  # a key block larger than the kernel's tile
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_triton_split_decode_matches_reference(case, per_kv_head, dtype):
    """The split-K decode kernel (dispatch's first choice for one query per head) against the fp32
    reference; its shares of each row are merged (several shares per row here: splits_for)."""
    from attnzoo.ops.kernels.triton_decode import splits_for

    q, k, v, kpm = _qkv(case, dtype, False, seed=case.Nk)
    H = case.Hkv if per_kv_head else case.Hq
    plan = _plan_to(random_block_plan(case.B, H, 1, case.Nk, *case.block, p=0.4, seed=7), DEVICE)
    assert splits_for(case.B * case.Hq, plan.max_blocks, q.device) > 1
    req = dispatch.make_request("block_sparse", q, k, v, "block", return_lse=True, key_padding_mask=kpm,
                                causal=True, block_size=(plan.block_q, plan.block_k))
    if DEVICE == "cuda":  # on a CPU the interpreter is never chosen automatically
        assert dispatch.choose(req).name == "triton_decode"
    out, lse = ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=True, backend="triton_decode")
    _compare(out, lse, q, k, v, kpm, plan, dtype, False)


@needs_triton
def test_triton_split_decode_empty_rows_and_prefill_declined():
    case = Case(2, 2, 1, 1, 100, 16)
    q, k, v, _ = _qkv(case, torch.float32, False)
    plan = _plan_to(random_block_plan(2, 2, 1, 100, 16, 16, p=0.5, seed=1), DEVICE)
    counts = plan.kv_counts.clone()
    counts[1, 0] = 0  # sequence 1, head 0 reads nothing: zeros, lse -inf
    plan = BlockPlan(plan.kv_indices, counts, 16, 16, 1, 100)
    out, lse = ops.block_sparse(q, k, v, plan, return_lse=True, backend="triton_decode")
    assert (out[1, 0] == 0).all() and torch.isinf(lse[1, 0]).all()
    _compare(out, lse, q, k, v, None, plan, torch.float32, False)
    q2 = torch.cat([q, q], 2)
    prefill = _plan_to(random_block_plan(2, 2, 2, 100, 16, 16, p=0.5, seed=1), DEVICE)
    with pytest.raises(dispatch.NoBackendError, match="decode only"):
        ops.block_sparse(q2, k, v, prefill, backend="triton_decode")


@needs_triton
def test_triton_empty_plan_rows_are_zero_with_finite_grads():
    case = Case(1, 2, 1, 64, 64, 16)
    q, k, v, _ = _qkv(case, torch.float32, True)
    mask = BlockPlan.full(1, 1, 64, 64, 32, 32).to_block_mask().clone()
    mask[:, :, 1] = False  # the second query block selects nothing
    plan = _plan_to(BlockPlan.from_block_mask(mask, 32, 32, 64, 64), DEVICE)
    out, lse = ops.block_sparse(q, k, v, plan, return_lse=True, backend="triton")
    assert (out[:, :, 32:] == 0).all() and torch.isinf(lse[:, :, 32:]).all()
    _compare(out, lse, q, k, v, None, plan, torch.float32, True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_triton_dense_matches_reference(case, dtype):
    """dense/triton serves what SDPA on CUDA declines: lse, padding, 1 < Nq < Nk."""
    grad = dtype == torch.float32
    q, k, v, kpm = _qkv(case, dtype, grad, seed=case.Nq)
    out, lse = ops.dense(q, k, v, causal=case.causal, key_padding_mask=kpm, return_lse=True, backend="triton")
    from attnzoo.plans import DensePlan

    _compare(out, lse, q, k, v, kpm, DensePlan(case.Nq, case.Nk, case.causal), dtype, grad)


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "token-major", "unaligned"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=str)
def test_triton_tma_forward_matches_reference(case, layout, setting):
    """The TMA forward (K/V through tensor descriptors; forced on, as on Hopper) on the layouts a
    model passes: contiguous, token-major views ([B, N, H, D] transposed, as HF projections give)
    and strides TMA cannot take (16-byte rule), which fall back to pointer loads."""

    setting(attention_tma=True)
    q, k, v, kpm = _qkv(case, torch.bfloat16, False, seed=5)
    if layout == "token-major":
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    elif layout == "unaligned":  # a row stride of D + 1 elements: not a multiple of 16 bytes
        k, v = (torch.cat([t, t[..., :1]], -1)[..., :case.D] for t in (k, v))
    assert tma_fits(k, v) == (layout != "unaligned")
    plan = _plan_to(random_block_plan(case.B, case.Hkv, case.Nq, case.Nk, *case.block, p=0.5, seed=case.Nq,
                                      causal=case.causal), DEVICE)
    out, lse = ops.block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=True, backend="triton")
    _compare(out, lse, q, k, v, kpm, plan, torch.bfloat16, False)


# -- Triton mixed-mode --------------------------------------------------------------------------

def _mixed_plan(case, B, H, modes, seed=0, sink=16, local=40):
    g = torch.Generator().manual_seed(seed)
    bs = case.block[0]
    mode = torch.tensor(modes, dtype=torch.int32).view(1, H).expand(B, H).contiguous()
    sink_t = torch.randint(0, 2 * sink, (B, H), generator=g, dtype=torch.int32)
    local_t = torch.randint(0, 2 * local, (B, H), generator=g, dtype=torch.int32)
    block = random_block_plan(B, H, case.Nq, case.Nk, bs, bs, p=0.4, seed=seed)
    plan = MixedPlan(mode, sink_t, local_t, block, bs, case.Nq, case.Nk)
    return MixedPlan(plan.mode.to(DEVICE), plan.sink.to(DEVICE), plan.local.to(DEVICE),
                     _plan_to(block, DEVICE), bs, case.Nq, case.Nk)


MIXED_CASES = [Case(2, 4, 4, 100, 100, 32, "right"), Case(2, 6, 2, 70, 130, 16, "left"),
               Case(1, 4, 2, 1, 90, 32)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MIXED_CASES, ids=str)
def test_triton_mixed_matches_reference(case, dtype):
    """Every mode present: dense, streaming (random sink/local per head) and block-sparse."""
    q, k, v, kpm = _qkv(case, dtype, True, seed=3)
    H = case.Hq
    modes = [i % len(MODES) for i in range(H)]
    plan = _mixed_plan(case, case.B, H, modes, seed=case.Nk)
    out, lse = ops.mixed(q, k, v, plan, key_padding_mask=kpm, return_lse=True, backend="triton")
    _compare(out, lse, q, k, v, kpm, plan, dtype, True)


@needs_triton
def test_backward_takes_the_atomic_kernel_only_on_a_grid_too_small_for_key_major(monkeypatch):
    """The dK/dV kernel by the key-major grid's programs per SM (H200: 132 SMs); the module flag
    overrides; the interpreter and CPU tensors keep the key-major kernel the tests cover."""
    from types import SimpleNamespace

    from attnzoo.ops.kernels import triton_attention as ta

    gpu_q = SimpleNamespace(is_cuda=True, device="cuda:0")
    monkeypatch.setattr(ta, "interpreting", lambda: False)
    monkeypatch.setattr(ta, "_sm_count", lambda device: 132)
    assert not ta.use_key_major(gpu_q, 64 * 3)  # 4K, batch 1, 3 KV heads: atomics measured faster
    assert ta.use_key_major(gpu_q, 256 * 3)  # 16K: key-major measured faster
    assert ta.use_key_major(gpu_q, 64 * 3 * 16)  # 4K, 16 rows (a router-training micro-batch)
    with settings.override(attention_key_major_backward=True):
        assert ta.use_key_major(gpu_q, 1)
    with settings.override(attention_key_major_backward=False):
        assert not ta.use_key_major(gpu_q, 10**6)
    assert ta.use_key_major(SimpleNamespace(is_cuda=False, device="cpu"), 1)


@pytest.mark.slow
@needs_triton
def test_triton_program_order_does_not_change_results(setting):
    """Heads on the grid's first axis (the default) or query tiles (the earlier order): the same
    output, lse and gradients, bit for bit, with padding, GQA and Nq < Nk; a grid past CUDA's
    second-axis limit is refused by name."""
    from attnzoo.ops.kernels import triton_attention as ta

    # the unsplit key-major dK/dV kernel: the atomic ones (chosen on a GPU for small grids) add in
    # whatever order programs finish, so their gradients differ by rounding between any two runs
    setting(attention_key_major_backward=True, attention_backward_split=(False, 1))
    for case in CASES[1:3]:  # right padding and GQA 2; left padding, GQA 4 and Nq < Nk
        q, k, v, kpm = _qkv(case, torch.float32, True, seed=3)
        plan = _plan_to(random_block_plan(case.B, case.Hq, case.Nq, case.Nk, *case.block, p=0.5, seed=4), DEVICE)
        got = []
        for heads_first in (True, False):
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            with settings.override(attention_heads_first=heads_first):
                out, lse = ops.block_sparse(qq, kk, vv, plan, key_padding_mask=kpm, return_lse=True, backend="triton")
                out.square().sum().backward()
            got.append([out, lse.nan_to_num(neginf=0.0), qq.grad, kk.grad, vv.grad])
        for a, b in zip(*got, strict=True):
            assert torch.equal(a, b), str(case)
    assert ta._grid(7, 5, True) == (5, 7) and ta._grid(7, 5, False) == (7, 5)
    with pytest.raises(ValueError, match="second grid axis; this call needs 70000 query tiles"):
        ta._grid(70_000, 9, True)


@pytest.mark.slow
@needs_triton
def test_triton_backward_key_major_equals_atomic(monkeypatch):
    """The key-major dK/dV kernel (unsplit and split) and the fp32-atomic one (kept for
    comparison) agree, every mode present, GQA 3, left padding, Nq < Nk; and the key-major walk
    lists exactly the blocks the forward walks (a block plan transposed back equals its mask)."""
    from attnzoo.ops.kernels import triton_attention as ta

    case = MIXED_CASES[1]
    q, k, v, kpm = _qkv(case, torch.float32, True, seed=5)
    plan = _mixed_plan(case, case.B, case.Hq, [i % len(MODES) for i in range(case.Hq)], seed=2)
    grads = []
    # the key-major kernel unsplit, split over the group's query heads and over query blocks, both;
    # then the atomic kernel
    for key_major, split in ((True, (False, 1)), (True, (True, 1)), (True, (False, 3)), (True, (True, 2)),
                             (False, None)):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        with settings.override(attention_key_major_backward=key_major, attention_backward_split=split):
            ops.mixed(qq, kk, vv, plan, key_padding_mask=kpm, backend="triton").square().sum().backward()
        grads.append([t.grad for t in (qq, kk, vv)])
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert rel_err(a, b) <= 1e-5
    blocks = _plan_to(random_block_plan(2, 3, 70, 130, 16, 32, p=0.4, seed=1), DEVICE)
    idx, cnt = ta.KernelPlan.from_block_plan(blocks).key_major(70, 130)
    # built in slices of (batch, plan head) rows, the same walk: a block plan and the mixed one
    kp_mixed = ta.KernelPlan.from_mixed_plan(plan)
    whole = kp_mixed.key_major(case.Nq, case.Nk)
    monkeypatch.setattr(ta.KernelPlan, "KEY_MAJOR_ENTRIES", 40)
    for got, want in ((ta.KernelPlan.from_block_plan(blocks).key_major(70, 130), (idx, cnt)),
                      (kp_mixed.key_major(case.Nq, case.Nk), whole)):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    nqb = blocks.kv_counts.shape[-1]
    listed = torch.arange(idx.shape[-1], device=DEVICE) < cnt[..., None]
    got = torch.zeros(2, 3, cnt.shape[-1], nqb + 1, dtype=torch.bool, device=DEVICE)
    got.scatter_(-1, torch.where(listed, idx.long(), nqb), True)  # unlisted entries: the spare column
    assert torch.equal(got[..., :nqb].transpose(-1, -2), blocks.to_block_mask().to(DEVICE))


@needs_triton
@pytest.mark.parametrize("mode", MODES)
def test_triton_mixed_single_mode_equals_its_op(mode):
    """All heads in one mode: dense == dense op, streaming == the streaming selector's plan."""
    case = Case(1, 2, 2, 96, 96, 16)
    q, k, v, _ = _qkv(case, torch.float32, False)
    plan = _mixed_plan(case, 1, 2, [MODES.index(mode)] * 2)
    out = ops.mixed(q, k, v, plan, backend="triton")
    if mode == "dense":
        ref = ops.dense(q, k, v)
    elif mode == "streaming":
        from attnzoo.selectors.streaming import Streaming
        ref = torch.cat([ops.reference(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1],
                                       Streaming(int(plan.sink[0, h]), int(plan.local[0, h]), 32)(
                                           q[:, h:h + 1], k[:, h:h + 1])) for h in range(2)], 1)
    else:
        ref = ops.block_sparse(q, k, v, plan.block, backend="blocked")
    assert rel_err(out, ref) <= 1e-5


def test_portable_mixed_backend_matches_reference():
    case = MIXED_CASES[1]
    q, k, v, kpm = _qkv(case, torch.float32, True)
    plan = _mixed_plan(case, case.B, case.Hq, [0, 1, 2, 2, 1, 0])
    out, lse = ops.mixed(q, k, v, plan, key_padding_mask=kpm, return_lse=True, backend="blocked")
    _compare(out, lse, q, k, v, kpm, plan, torch.float32, True)


def test_mixed_plan_contract(monkeypatch):
    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "1")  # value checks are CPU-only by default (GPU: host syncs)
    case = Case(2, 4, 2, 100, 100, 32)
    plan = _mixed_plan(case, 2, 4, [0, 1, 2, 1])
    assert "dense=0.25" in repr(plan) and "streaming=0.50" in repr(plan)
    assert plan.to_mask().shape == (2, 4, 100, 100)
    d = plan.density(reduce=False)
    assert torch.allclose(d[:, 0], torch.ones(2, dtype=d.dtype, device=d.device)) and (d[:, 2] < 1).all()
    with pytest.raises(ValueError, match="block-mode heads need a BlockPlan"):
        MixedPlan(plan.mode, plan.sink, plan.local, None, 32, 100, 100)
    with pytest.raises(ValueError, match="mode values"):
        MixedPlan(plan.mode + 3, plan.sink, plan.local, plan.block, 32, 100, 100)
    with pytest.raises(ValueError, match="local must be"):
        MixedPlan(plan.mode, plan.sink, plan.local[:1], plan.block, 32, 100, 100)


# -- Triton XAttention scoring ------------------------------------------------------------------

SCORE_CASES = [
    (Case(2, 4, 2, 100, 130, 32, "right"), 4, 32),
    (Case(2, 2, 1, 96, 96, 16, "left"), 2, 32),
    (Case(1, 2, 2, 200, 200, 64), 8, 128),
]


@needs_triton
@pytest.mark.parametrize("q_tile", ["resident", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,stride,block", SCORE_CASES, ids=lambda x: str(x))
def test_triton_scores_match_torch(case, stride, block, dtype, q_tile, monkeypatch):
    """Both ways of forming the reduced product: the query tile held in registers, or streamed
    in S slices of D columns (wide tiles, e.g. D 128 at stride 8)."""
    from attnzoo.ops.kernels import triton_scores as ts

    config = ts.launch_config
    monkeypatch.setattr(ts, "launch_config", lambda *a: {**config(*a), "Q_RESIDENT": q_tile == "resident"})
    q, k, _, kpm = _qkv(case, dtype, False, seed=7)
    kw = dict(stride=stride, block_size=block, chunk_size=2 * block, key_padding_mask=kpm)
    ref = torch.cat([w for _, _, w in antidiagonal_block_scores(q.float(), k.float(), backend="torch", **kw)], 2)
    # the Triton scorer yields the chunks asked for under the interpreter, one chunk on a GPU
    got = torch.cat([w for _, _, w in antidiagonal_block_scores(q, k, backend="triton", **kw)], 2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= tol  # probabilities: absolute error


def _spy_scores_kernel(ts, key: str, monkeypatch) -> list:
    """Record ``meta[key]`` of every scoring-kernel launch (which path the scorer took)."""
    seen, kernel = [], ts._scores_kernel
    monkeypatch.setattr(ts, "_scores_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: lambda *a, **meta: (seen.append(meta.get(key)), kernel[grid](*a, **meta))})())
    return seen


TMA_SCORE_CASES = [
    (Case(1, 2, 1, 256, 256, 32), 8, 64),  # whole stride groups: every program through descriptors
    (Case(2, 4, 2, 203, 203, 32), 8, 64),  # a partial last group of queries and keys
    (Case(1, 2, 1, 70, 202, 16), 4, 32),  # chunked prefill (Nq < Nk), partial groups at both ends
]


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "token-major", "unaligned"])
@pytest.mark.parametrize("case,stride,block", TMA_SCORE_CASES, ids=lambda x: str(x))
def test_triton_scores_tma_matches_torch(case, stride, block, layout, monkeypatch, setting):
    """Q and K through tensor descriptors (forced on, as on Hopper): programs whose rows or
    columns hold a partial stride group take pointer loads, the others the descriptors; layouts a
    model passes (token-major views) and strides TMA cannot take (which fall back)."""
    from attnzoo.ops.kernels import triton_scores as ts

    config = ts.launch_config
    setting(scores_tma=True)
    # a GPU's shipped config may decline TMA (it does where pointer loads measured faster): force it
    monkeypatch.setattr(ts, "launch_config", lambda *a: {**config(*a), "Q_RESIDENT": False, "TMA": True})
    seen = _spy_scores_kernel(ts, "TMA", monkeypatch)
    q, k, _, _ = _qkv(case, torch.bfloat16, False, seed=11)
    if layout == "token-major":
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    elif layout == "unaligned":  # a row stride of D + 1 elements: not a multiple of 16 bytes
        q, k = (torch.cat([t, t[..., :1]], -1)[..., :case.D] for t in (q, k))
    kw = dict(stride=stride, block_size=block, chunk_size=2 * block)
    ref = torch.cat([w for _, _, w in antidiagonal_block_scores(q.float(), k.float(), backend="torch", **kw)], 2)
    got = torch.cat([w for _, _, w in antidiagonal_block_scores(q, k, backend="triton", **kw)], 2)
    assert seen and all(seen) == (layout != "unaligned")
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 2e-2


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "token-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,stride,block", SCORE_CASES + TMA_SCORE_CASES[1:], ids=lambda x: str(x))
def test_triton_scores_gemm_matches_torch(case, stride, block, dtype, layout, monkeypatch, setting):
    """The reduced product through a batched GEMM (cuBLAS on a GPU), then the kernel reads it
    (``PRE``): padding masks, partial stride groups, GQA, chunked prefill, several launches, and
    the token-major layout a model passes (its reduced rows are copied per launch)."""
    from attnzoo.ops.kernels import triton_scores as ts

    config = ts.launch_config
    setting(scores_gemm=True)
    monkeypatch.setattr(ts, "launch_config", lambda *a: {**config(*a), "GEMM": True})
    seen = _spy_scores_kernel(ts, "PRE", monkeypatch)
    q, k, _, kpm = _qkv(case, dtype, False, seed=13)
    if layout == "token-major":
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    kw = dict(stride=stride, block_size=block, chunk_size=2 * block, key_padding_mask=kpm)
    ref = torch.cat([w for _, _, w in antidiagonal_block_scores(q.float(), k.float(), backend="torch", **kw)], 2)
    got = torch.cat([w for _, _, w in antidiagonal_block_scores(q, k, backend="triton", **kw)], 2)
    assert seen and all(seen)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2)
    # a routed layer declines the GEMM (it would score the unrouted groups too)
    seen.clear()
    active = torch.ones(case.B, case.Hkv, dtype=torch.bool, device=DEVICE)
    next(iter(antidiagonal_block_scores(q, k, backend="triton", active_heads=active, **kw)))
    assert seen and not any(seen)


@needs_triton
def test_triton_scores_skip_inactive_query_groups():
    """A routed layer scores only the KV groups routed to the branch: the others stay zero."""
    case = Case(2, 4, 2, 100, 130, 32, "right")
    q, k, _, kpm = _qkv(case, torch.float32, False, seed=7)
    kw = dict(stride=4, block_size=32, chunk_size=64, key_padding_mask=kpm)
    full = torch.cat([w for _, _, w in antidiagonal_block_scores(q, k, backend="triton", **kw)], 2)
    active = torch.tensor([[True, False], [False, True]], device=DEVICE)
    got = torch.cat([w for _, _, w in antidiagonal_block_scores(q, k, backend="triton", active_heads=active, **kw)], 2)
    rows = active.repeat_interleave(2, dim=1)  # [B, Hq]: query heads of each KV group
    assert torch.equal(got[rows], full[rows]) and full[rows].abs().max() > 0
    assert torch.count_nonzero(got[~rows]) == 0


POOLED_CASES = [
    (Case(2, 4, 2, 100, 130, 32, "right"), 16),
    (Case(2, 6, 2, 96, 96, 16, "left"), 32),
    (Case(1, 2, 1, 70, 200, 32), 16),  # chunked prefill: Nq < Nk
    (Case(2, 2, 2, 1, 90, 16, "right"), 16),  # decode: one query
    (Case(1, 2, 1, 600, 600, 16), 16),  # long enough for unmasked interior column tiles
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case,block", POOLED_CASES, ids=lambda x: str(x))
def test_triton_pooled_scores_match_torch(case, block, dtype):
    from attnzoo.ops.pooled import pooled_block_scores

    q, k, _, kpm = _qkv(case, dtype, False, seed=5)
    # the reference: the torch backend on the same inputs (pooled keys in the input dtype; fp32 math)
    ref = pooled_block_scores(q, k, block_size=block, key_padding_mask=kpm, backend="torch")
    got = pooled_block_scores(q, k, block_size=block, key_padding_mask=kpm, backend="triton")
    assert got.shape == ref.shape and got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # sums of probabilities: absolute error
    assert (got - ref).abs().max() <= tol
    assert ref.abs().max() > 0 or case.Nq == 1
    # masked scores (what the selection reads): the same candidates (-1 elsewhere) and scores
    kw = dict(block_size=block, key_padding_mask=kpm, masked=True)
    a, b = pooled_block_scores(q, k, backend="triton", **kw), pooled_block_scores(q, k, backend="torch", **kw)
    assert torch.equal(a >= 0, b >= 0) and (a - b).abs().max() <= tol
    # sink and local blocks marked in the same launch: FIRST at exactly the torch backend's entries
    from attnzoo.ops.pooled import FIRST, forced_blocks, past_blocks

    for sink, local in ((1, 0), (0, 2), (2, 3)):
        a, b = (pooled_block_scores(q, k, backend=be, sink_blocks=sink, local_blocks=local, **kw)
                for be in ("triton", "torch"))
        first = b == FIRST
        assert torch.equal(a == FIRST, first) and torch.equal(a >= 0, b >= 0)
        assert (a - b)[~first].abs().max() <= tol
        want = forced_blocks(past_blocks(case.Nq, case.Nk, block, q.device), sink, local) & (b >= 0)
        assert torch.equal(first, want.expand_as(first)), "FIRST marks the sink / local candidates, nothing else"


@needs_triton
def test_topk_selector_same_plan_with_triton_scores(monkeypatch):
    from attnzoo.context import CallContext
    from attnzoo.selectors.topk_blocks import TopKBlocks

    case = Case(2, 4, 2, 150, 150, 32, "left")
    q, k, _, kpm = _qkv(case, torch.float32, False, seed=4)
    sel = TopKBlocks(block_size=16, top_k=3)
    ctx = CallContext(key_padding_mask=kpm, starts_aligned=True)  # the left-padded mask as given, not refused
    monkeypatch.setenv("ATTNZOO_BACKEND", "pooled_scores=torch")
    a = sel(q, k, ctx)
    monkeypatch.setenv("ATTNZOO_BACKEND", "pooled_scores=triton")
    b = sel(q, k, ctx)
    assert torch.equal(a.to_block_mask(), b.to_block_mask())
    assert a.density() < 0.8  # the selection is really sparse here


@needs_triton
@pytest.mark.parametrize("nq,nk,b", [(300, 300, 32), (100, 333, 16), (64, 64, 64), (1, 200, 16)])
@pytest.mark.parametrize("keep", [(True, True), (False, True), (True, False)], ids=lambda k: f"sink{k[0]}-diag{k[1]}")
def test_triton_select_by_mass_equals_torch(nq, nk, b, keep):
    from attnzoo.ops import selection
    from attnzoo.plans import last_visible_block

    nqb, nkb = -(-nq // b), -(-nk // b)
    g = torch.Generator().manual_seed(nq + nk)
    w = torch.rand(2, 3, nqb, nkb, generator=g) ** 3  # skewed, like attention mass
    w[:, :, :, ::3] = 0.0  # exact zeros: candidates that tie
    w[:, :, :, 1::5] = 0.2  # positive ties, often at the cut
    tau = torch.tensor([0.5, 0.9, 1.0]).view(1, 3, 1, 1)
    last = last_visible_block(nq, nk, b, b).to(DEVICE)
    args = (w.to(DEVICE), tau.to(DEVICE), (tau >= 1).to(DEVICE), last)
    kw = dict(keep_sink=keep[0], keep_diagonal=keep[1])
    i1, c1 = selection.by_mass(*args, backend="torch", **kw)
    i2, c2 = selection.by_mass(*args, backend="triton", **kw)
    p1, p2 = (BlockPlan(i, c, b, b, nq, nk) for i, c in ((i1, c1), (i2, c2)))
    p1.check_indices()
    p2.check_indices()
    assert torch.equal(c1, c2) and torch.equal(p1.to_block_mask(), p2.to_block_mask())
    assert 0 < p1.density() < 1 or nkb == 1


@needs_triton
@pytest.mark.parametrize("nq,nk,b,k", [(300, 300, 16, 4), (100, 333, 16, 3), (64, 64, 32, 8), (1, 200, 16, 2)])
def test_triton_select_top_n_equals_torch(nq, nk, b, k):
    from attnzoo.ops import selection
    from attnzoo.ops.pooled import past_blocks
    from attnzoo.plans import last_visible_block

    nqb, nkb = -(-nq // b), -(-nk // b)
    g = torch.Generator().manual_seed(nq + k)
    score = torch.rand(2, 2, nqb, nkb, generator=g)
    score[:, :, :, 1::4] = 0.25  # ties
    score[:, :, :, 2::5] = 0.0  # ties at zero (fully underflowed blocks)
    past = past_blocks(nq, nk, b, "cpu")
    keys = score.masked_fill(~past[None, None], -1.0).to(DEVICE)
    last = last_visible_block(nq, nk, b, b)
    own_lo = past.sum(-1)
    n_pick = (k - (last - own_lo + 1).clamp(min=0)).clamp(min=0)
    args = (keys, n_pick.to(DEVICE), own_lo.to(DEVICE), last.to(DEVICE))
    i1, c1 = selection.top_n(*args, width=k, backend="torch")
    i2, c2 = selection.top_n(*args, width=k, backend="triton")
    p1, p2 = (BlockPlan(i, c, b, b, nq, nk) for i, c in ((i1, c1), (i2, c2)))
    p1.check_indices()
    assert torch.equal(c1, c2) and torch.equal(p1.to_block_mask(), p2.to_block_mask())
    assert int(c1.max()) <= max(k, 2)


@needs_triton
@pytest.mark.parametrize("radix", [False, True], ids=["binary", "radix"])
@pytest.mark.parametrize("pages,n", [(200, 7), (3000, 64), (40, 60)])  # (40, 60): more picks than candidates
def test_triton_select_top_n_cut_searches_equal_torch(pages, n, radix):
    """The two cut searches of the top_n kernel (31-step binary, and 8 histograms of 4-bit digits, the
    decode default) pick what torch's stable sort does: ties in the top digits and at the cut, zeros,
    the sink's key, non-candidates, scores whose bits share their high digits."""
    from attnzoo.ops import pages as pages_op
    from attnzoo.ops import selection
    from attnzoo.ops.kernels import triton_select

    g = torch.Generator().manual_seed(pages + n)
    score = torch.rand(2, 3, 1, pages, generator=g)
    score[0, 0] = 1.0 + torch.rand(pages, generator=g) * 1e-6  # bits that differ in the low digits only
    score[0, 1, 0, 1::3] = 0.5  # ties
    score[0, 2, 0, 2::7] = 0.0
    score[1, 0, 0, :5] = pages_op.SINK_SCORE
    score[1, 1, 0, torch.rand(pages, generator=g) < 0.5] = -1.0
    score[..., -1] = -1.0  # the own page: the forced block
    last = torch.tensor([pages - 1])
    args = (score.to(DEVICE), torch.tensor([n - 1]).to(DEVICE), last.to(DEVICE), last.to(DEVICE))
    i1, c1 = selection.top_n(*args, width=n, backend="torch")
    i2, c2 = triton_select._launch("top_n", args[0], n + 2, last=args[3], n_pick=args[1], own_lo=args[2],
                                   radix=radix)
    p1, p2 = (BlockPlan(i, c, 16, 16, 1, 16 * pages) for i, c in ((i1, c1), (i2, c2)))
    assert torch.equal(c1, c2) and torch.equal(p1.to_block_mask(), p2.to_block_mask())
    assert int(c1.max()) == min(n, pages)


@needs_triton
@pytest.mark.parametrize("nq,nk,b,k,sink,local", [(300, 300, 16, 4, 32, 64), (100, 333, 16, 2, 0, 48)])
def test_triton_select_top_n_keeps_topk_sink_and_window_like_torch(nq, nk, b, k, sink, local):
    """``topk_blocks``' sink and local window reach the selection as top scores (the largest finite
    fp32): the Triton kernel ranks them first exactly as torch does."""
    from attnzoo.ops import selection
    from attnzoo.ops.pooled import FIRST
    from attnzoo.selectors.topk_blocks import _sets

    nqb, nkb = -(-nq // b), -(-nk // b)
    sets = _sets(nq, nk, b, k, -(-sink // b), -(-local // b), "cpu")
    g = torch.Generator().manual_seed(nk)
    score = torch.rand(2, 2, nqb, nkb, generator=g)
    past = sets.forced | (torch.arange(nkb)[None, :] < sets.own_lo[:, None])
    keys = score.masked_fill(~past[None, None], -1.0)
    keys = torch.where(sets.forced & (keys >= 0), FIRST, keys).to(DEVICE)
    args = (keys, sets.n_pick.to(DEVICE), sets.own_lo.to(DEVICE), sets.last.to(DEVICE))
    width = k + -(-sink // b) + -(-local // b)
    i1, c1 = selection.top_n(*args, width=width, backend="torch")
    i2, c2 = selection.top_n(*args, width=width, backend="triton")
    p1, p2 = (BlockPlan(i, c, b, b, nq, nk) for i, c in ((i1, c1), (i2, c2)))
    assert torch.equal(c1, c2) and torch.equal(p1.to_block_mask(), p2.to_block_mask())
    kept = p1.to_block_mask().cpu()
    assert bool((kept | ~sets.forced).all()), "every sink and window block is kept"


@needs_triton
def test_xattention_selector_same_plan_with_triton_scores(monkeypatch):
    from attnzoo.selectors.xattention import XAttention
    case = Case(2, 4, 2, 100, 130, 32, "right")
    q, k, _, kpm = _qkv(case, torch.float32, False, seed=2)
    sel = XAttention(threshold=0.8, stride=4, block_size=32, chunk_size=64)
    from attnzoo.context import CallContext
    ctx = CallContext(key_padding_mask=kpm)
    monkeypatch.setenv("ATTNZOO_BACKEND", "antidiagonal_scores=torch")
    a = sel(q, k, ctx)
    monkeypatch.setenv("ATTNZOO_BACKEND", "antidiagonal_scores=triton")
    b = sel(q, k, ctx)
    assert torch.equal(a.to_block_mask(), b.to_block_mask())


# -- a routed stack as one launch ---------------------------------------------------------------

ROUTED = {"default": {"router": {"name": "table", "heads": {0: ["full", "sparse", "sparse", "full"]}},
                      "branches": {"full": {"op": "dense"}, "sparse": None}}}


@needs_triton
@pytest.mark.parametrize("sparse", [
    {"selector": {"name": "streaming", "sink": 32, "local": 32, "block_size": 32}, "op": "block_sparse"},
    {"selector": {"name": "xattention", "stride": 4, "block_size": 32, "chunk_size": 64,
                  "threshold": 0.8}, "op": "block_sparse"},
], ids=["fa-streaming", "fa-xattention"])
def test_routed_stack_single_launch_equals_per_branch(sparse, monkeypatch):
    cfg = {"default": {**ROUTED["default"], "branches": {"full": {"op": "dense"}, "sparse": sparse}}}
    stack = build(cfg)
    case = Case(2, 8, 4, 100, 100, 32, "right")
    q, k, v, kpm = _qkv(case, torch.float32, False, seed=5)
    ctx = CallContext(key_padding_mask=kpm, layer_idx=0)
    node = stack.node_for(0)
    split = node(q, k, v, ctx)
    calls = []
    import attnzoo.stack.routed as stack_mod
    orig = stack_mod.mixed_op
    monkeypatch.setattr(stack_mod, "mixed_op", lambda *a, **kw: calls.append(kw["backend"]) or orig(*a, **kw))
    monkeypatch.setenv("ATTNZOO_BACKEND", "mixed=triton")
    fused = node(q, k, v, ctx)
    assert calls == ["triton"], "the routed layer did not run as one mixed launch"
    assert rel_err(fused, split) <= 1e-5


@needs_triton
@pytest.mark.parametrize("heads,max_runs", [(["full", "sparse", "sparse", "full"], 4),
                                            (["full", "sparse", "sparse", "full"], 0),
                                            (["sparse"] * 4, 4), (["full"] * 4, 4)],
                         ids=["half-views", "half-gathered", "no-dense", "all-dense"])
@pytest.mark.slow
def test_routed_hybrid_path_equals_split(heads, max_runs, monkeypatch, setting):
    """The hybrid path (sparse heads in one launch queued first, dense heads filled in by the dense
    op) gives the split path's output, gradients and metered density, for any share of dense heads."""
    from attnzoo.stack import DensityMeter
    setting(max_head_runs=max_runs)
    sparse = {"selector": {"name": "xattention", "stride": 4, "block_size": 32, "chunk_size": 64,
                           "threshold": 0.8}, "op": "block_sparse"}
    stack = build({"default": {"router": {"name": "table", "heads": {0: heads}},
                               "branches": {"full": {"op": "dense"}, "sparse": sparse}}})
    node = stack.node_for(0)
    q, k, v, kpm = _qkv(Case(2, 8, 4, 100, 100, 32, "right"), torch.float32, False, seed=6)
    outs, grads, dens = [], [], []
    for path in ("split", "hybrid"):
        monkeypatch.setenv("ATTNZOO_BACKEND", "mixed=triton")
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        meter = DensityMeter()
        ctx = CallContext(key_padding_mask=kpm, layer_idx=0, meter=meter)
        out = node._paths()[path](qq, kk, vv, node.decide(qq, kk, ctx), ctx)
        assert out is not None, f"{path} declined"
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (qq, kk, vv)])
        dens.append(meter.mean())
    assert rel_err(outs[1], outs[0]) <= 1e-5
    for a, b in zip(*grads, strict=True):
        assert rel_err(b, a) <= 1e-4
    assert dens[1] == pytest.approx(dens[0], abs=1e-6)


def test_hybrid_declines_without_exactly_one_dense_branch():
    stack = build({"default": {"router": {"name": "table", "heads": {0: ["a", "b"]}},
                               "branches": {"a": {"selector": {"name": "streaming", "sink": 32, "local": 32,
                                                               "block_size": 32}, "op": "block_sparse"},
                                            "b": {"selector": {"name": "streaming", "sink": 64, "local": 64,
                                                               "block_size": 32}, "op": "block_sparse"}}}})
    node = stack.node_for(0)
    q, k, v, _ = _qkv(Case(1, 4, 2, 64, 64, 32, None), torch.float32, False, seed=1)
    ctx = CallContext(layer_idx=0)
    assert node._hybrid(q, k, v, node.decide(q, k, ctx), ctx) is None


# -- FlashInfer: plan conversion (CPU) ----------------------------------------------------------

def _emulate_flashinfer(call: fib.VariableBlockCall, q, k, v, scale):
    """FlashInfer's documented semantics for one call, literally: per (KV head, row block),
    gather the selected column blocks; with causal, row i of R rows sees gathered key j iff
    j <= i + L - R. Returns (out [Hq, Nq, D], lse [Hq, Nq]) in fp32."""
    Hq, Nq, D = q.shape
    Hkv = k.shape[0]
    g = Hq // Hkv
    out = torch.zeros(Hq, Nq, D)
    lse = torch.full((Hq, Nq), float("-inf"))
    rstart = torch.cumsum(call.block_row_sz, 1) - call.block_row_sz
    cstart = torch.cumsum(call.block_col_sz, 1) - call.block_col_sz
    for h in range(Hkv):
        for r in range(call.block_mask_map.shape[1]):
            cols = call.block_mask_map[h, r].nonzero().flatten().tolist()
            if not cols:
                continue
            keys = torch.cat([torch.arange(int(cstart[h, c]), int(cstart[h, c] + call.block_col_sz[h, c]))
                              for c in cols])
            r0, R = int(rstart[h, r]), int(call.block_row_sz[h, r])
            L = len(keys)
            for qh in range(h * g, (h + 1) * g):
                s = q[qh, r0:r0 + R].float() @ k[h, keys].float().T * scale
                if call.causal:
                    ok = torch.arange(L)[None, :] <= torch.arange(R)[:, None] + L - R
                    s = s.masked_fill(~ok, float("-inf"))
                lse[qh, r0:r0 + R] = torch.logsumexp(s, -1)
                out[qh, r0:r0 + R] = torch.softmax(s, -1) @ v[h, keys].float()
    return out, lse


@pytest.mark.parametrize("drop_diagonal", [False, True], ids=["diag-kept", "diag-dropped"])
@pytest.mark.parametrize("Nq,Nk,causal", [(96, 96, True), (100, 100, True), (36, 100, True),
                                          (50, 90, False)])
def test_flashinfer_conversion_is_exact_under_its_causal_rule(Nq, Nk, causal, drop_diagonal):
    Hq, Hkv, D, b = 4, 2, 16, 32
    if causal and (Nk - Nq) % b:
        Nk = Nq + b * ((Nk - Nq) // b)  # aligned geometry: what the backend accepts
    plan = random_block_plan(2, Hkv, Nq, Nk, b, b, p=0.5, seed=Nq, causal=causal, poison=False)
    mask = plan.to_block_mask()
    if causal:
        last = plan.last_visible_block()
        diag = torch.zeros_like(mask)
        diag[..., torch.arange(mask.shape[2]), last] = True
        mask = (mask & ~diag) if drop_diagonal else (mask | diag)
    plan = BlockPlan.from_block_mask(mask, b, b, Nq, Nk, causal)
    q, k, v = make_qkv(2, Hq, Hkv, Nq, Nk, D, seed=1)
    ref, ref_lse = ops.reference(q, k, v, plan, return_lse=True)
    for bi in range(2):
        calls = fib.variable_block_calls(plan, bi)
        assert len(calls) == (2 if causal and drop_diagonal and mask[bi].any() else 1)
        union = torch.zeros_like(calls[0].block_mask_map)
        for c in calls:
            assert c.block_mask_map.shape == (Hkv, -(-Nq // b), -(-Nk // b))
            assert int(c.block_row_sz.sum(1)[0]) == Nq and int(c.block_col_sz.sum(1)[0]) == Nk
            assert not (union & c.block_mask_map).any(), "a block is computed twice"
            union |= c.block_mask_map
        assert torch.equal(union, mask[bi]), "conversion does not round-trip the plan"
        parts = [_emulate_flashinfer(c, q[bi], k[bi], v[bi], D ** -0.5) for c in calls]
        o, lse = parts[0]
        for o2, l2 in parts[1:]:
            o, lse = ops.merge_attention(o, lse, o2, l2)
        assert rel_err(o, ref[bi]) <= 1e-5
        assert_lse_close(lse, ref_lse[bi], 1e-5)


def test_flashinfer_declines_geometry_its_causal_rule_cannot_express():
    assert "square blocks" in fib.geometry_reason((64, 32, 100, 100, True))
    assert "aligned" in fib.geometry_reason((32, 32, 50, 100, True))
    assert fib.geometry_reason((32, 32, 36, 100, True)) is None
    assert fib.geometry_reason((64, 32, 50, 100, False)) is None
    req = dispatch.Request(op="block_sparse", device="cuda", dtype=torch.bfloat16, head_dim=128,
                           plan_kind="block", q_len=100, kv_len=100, q_heads=8, kv_heads=2, plan_heads=8,
                           block_size=(64, 64))
    assert "per-KV-head plan" in fib.FLASHINFER_BLOCK_SPARSE.check(req)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only declarations")
def test_cuda_backends_unavailable_on_cpu_with_reasons():
    from attnzoo.cli import info_text
    text = info_text()
    for name in ("dense/flashinfer", "block_sparse/flashinfer", "block_sparse/triton", "mixed/triton",
                 "antidiagonal_scores/triton"):
        assert name in text
    req = dispatch.Request(op="dense", device="cpu", dtype=torch.bfloat16, head_dim=64, plan_kind="dense")
    reasons = dict(dispatch.explain(req))
    assert reasons["flashinfer"]  # declined, with a reason (not installed, or CUDA only)
    assert "interpreter" in dict(dispatch.explain(dataclasses.replace(req, op="block_sparse", plan_kind="block",
                                                                      block_size=(32, 32))))["triton"]


@pytest.mark.skipif(fib.flashinfer_missing() is not None, reason="needs flashinfer")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", ["dense", "block_sparse"])
def test_flashinfer_kernels_match_reference(op):
    case = Case(2, 8, 2, 256, 256, 128)
    q, k, v, _ = _qkv(case, torch.bfloat16, False)
    if op == "dense":
        out, lse = ops.dense(q, k, v, return_lse=True, backend="flashinfer")
        plan = None
    else:
        plan = _plan_to(random_block_plan(2, 2, 256, 256, 64, 64, p=0.5, seed=3, poison=False), DEVICE)
        out, lse = ops.block_sparse(q, k, v, plan, return_lse=True, backend="flashinfer")
    _compare(out, lse, q, k, v, None, plan, torch.bfloat16, False)


@needs_triton
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
def test_triton_page_scores_static_cache_own_page_equal_torch(per_kv_head):
    """A static cache's decode step: the query's page (a device tensor) is not the last; its bounds are
    updated from its written slots, pages after it are never candidates, the window sits before it;
    Triton and torch agree."""
    from attnzoo.ops import pages
    from attnzoo.selectors.quest import Quest

    B, Hq, Hkv, Nk, D, p = 2, 4, 2, 400, 32, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, 1, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(DEVICE)
    written = 301  # slots 0..300 written: the query is slot 300, page 18 of 25
    kpm = (torch.arange(Nk) < written)[None].expand(B, Nk).to(DEVICE)
    n_pages = -(-Nk // p)
    own = torch.tensor([300 // p], device=DEVICE)
    forced = own - 2
    sel = Quest(page_size=p, budget=8 * p)
    lo0, hi0 = sel.decode_bounds(k, kpm, static=True)
    out = {}
    for backend in ("torch", "triton"):
        lo, hi = lo0.clone(), hi0.clone()
        s = pages.page_scores(q, lo, hi, n_pages=n_pages, forced_lo=forced, page_size=p, k=k, key_padding_mask=kpm,
                              per_kv_head=per_kv_head, own_page=own, backend=backend)
        out[backend] = s, lo, hi
    (s1, lo1, hi1), (s2, lo2, hi2) = out["torch"], out["triton"]
    ref_lo, ref_hi = sel.page_bounds(k[:, :, :written])
    assert torch.equal(lo1[:, :, :19].float(), ref_lo) and torch.equal(hi1[:, :, :19].float(), ref_hi)
    for a, b in ((lo1, lo2), (hi1, hi2)):
        assert torch.equal(a[:, :, :n_pages], b[:, :, :n_pages])
    assert (s1[..., 18:] == -1).all(), "the own page and the unwritten ones are not candidates"
    assert (s1[..., 16:18] == pages.SINK_SCORE).all() and (s1[..., 0] == pages.SINK_SCORE).all()
    assert torch.equal(s1 < 0, s2 < 0) and torch.equal(s1 == pages.SINK_SCORE, s2 == pages.SINK_SCORE)
    assert (s1.view(torch.int32).long() - s2.view(torch.int32).long()).abs().max() <= 64


@needs_triton
@pytest.mark.parametrize("B,Hq,Hkv,Nk,D,pad,forced", [(1, 9, 3, 300, 64, None, None), (2, 4, 2, 333, 16, "left", 2),
                                                       (2, 8, 1, 256, 32, "right", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
def test_triton_page_scores_equal_torch(B, Hq, Hkv, Nk, D, pad, forced, dtype, per_kv_head):
    """Quest's decode scores: the Triton kernel updates the last page's bounds in place exactly as the
    torch reference does (bit for bit: min / max of the keys), its scores order the pages as the
    reference bounds do (equal up to fp32 summation order), and top_n picks the same pages."""
    from attnzoo.ops import pages, selection
    from attnzoo.selectors.quest import Quest

    p = 16
    g = torch.Generator().manual_seed(Nk + D)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype).to(DEVICE)
    kpm = padding_mask(B, Nk, pad)
    kpm = None if kpm is None else kpm.to(DEVICE)
    n_pages = -(-Nk // p)
    last = n_pages - 1
    forced_lo = last if forced is None else last - forced
    sel = Quest(page_size=p, budget=8 * p)
    lo0, hi0 = sel.decode_bounds(k[:, :, : last * p + 1], None if kpm is None else kpm[:, : last * p + 1])
    out = {}
    for backend in ("torch", "triton"):
        lo, hi = lo0.clone(), hi0.clone()
        s = pages.page_scores(q, lo, hi, n_pages=n_pages, forced_lo=forced_lo, page_size=p, k=k,
                              key_padding_mask=kpm, per_kv_head=per_kv_head, backend=backend)
        out[backend] = s, lo, hi
    (s1, lo1, hi1), (s2, lo2, hi2) = out["torch"], out["triton"]
    assert s1.shape == s2.shape == (B, Hkv if per_kv_head else Hq, 1, n_pages)
    ref_lo, ref_hi = sel.page_bounds(k, kpm)
    assert torch.equal(lo1[:, :, :n_pages].float(), ref_lo) and torch.equal(hi1[:, :, :n_pages].float(), ref_hi)
    for a, b in ((lo1, lo2), (hi1, hi2)):
        assert torch.equal(a[:, :, :n_pages], b[:, :, :n_pages])
    assert torch.equal(s1 < 0, s2 < 0) and torch.equal(s1 == pages.SINK_SCORE, s2 == pages.SINK_SCORE)
    # the keys differ only by rounding of the bound (two bits dropped, fp32 sums in another order)
    k1, k2 = (s.view(torch.int32).long() for s in (s1, s2))
    assert (k1 - k2).abs().max() <= 64
    assert (s1[..., :-1] >= 0).any(), "some pages compete on their bounds"
    rule = [torch.tensor([x], device=DEVICE) for x in (8 - 1, last, last)]
    plans = [BlockPlan(*selection.top_n(s, *rule, width=8), p, p, 1, Nk) for s in (s1, s2)]
    plans[0].check_indices()
    assert torch.equal(plans[0].to_block_mask(), plans[1].to_block_mask())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(2, 9, 3, 333, 333, 64, "left"), Case(1, 8, 2, 150, 400, 32, "right"),
                                  Case(2, 2, 1, 200, 200, 64)], ids=str)
def test_grouped_kernel_on_top_k_plans_matches_reference(case, dtype):
    """``triton_grouped`` stacks a GQA group's heads (3 x 16 rows padded to 64; 4 x 16; 2 x 16) over
    top-k blocks' shared plans: output and lse against the fp64 reference, and dispatch picks it."""
    from attnzoo.context import CallContext
    from attnzoo.ops import dispatch, reference
    from attnzoo.ops.block_sparse import block_sparse
    from attnzoo.selectors.topk_blocks import TopKBlocks

    q, k, v, kpm = _qkv(case, dtype, False, seed=7)
    plan = TopKBlocks(block_size=16, top_k=3, chunk_size=64, sink=16, local=32)(
        q, k, CallContext(key_padding_mask=kpm, starts_aligned=True))
    assert plan.heads == case.Hkv and plan.density() < 0.9
    out, lse = block_sparse(q, k, v, plan, key_padding_mask=kpm, return_lse=True, backend="triton_grouped")
    ref, ref_lse = reference(q.double(), k.double(), v.double(), plan, key_padding_mask=kpm, return_lse=True)
    real = torch.isfinite(ref_lse)  # rows with a visible key (left padding leaves some with none)
    assert torch.equal(torch.isfinite(lse), real)
    tol_out, tol_lse, _ = TOL[dtype]
    assert (out.double() - ref).abs()[real].max() <= tol_out * 10
    assert (lse.double() - ref_lse)[real].abs().max() <= tol_lse * 10
    req = dispatch.make_request("block_sparse", q, k, v, "block", return_lse=False, key_padding_mask=kpm,
                                causal=True, plan_heads=plan.heads, block_size=(16, 16))
    names = [b.name for b in dispatch.backends("block_sparse")]
    assert names.index("triton_grouped") < names.index("triton")
    if q.is_cuda:  # (the CPU prefers its torch backends to the interpreter)
        assert dispatch.choose(req).name == "triton_grouped"
