"""Dense attention told each head's real rows (``row_lengths``), and Token Sparse at a static width.

A compressed node whose inner dense attention skips the padded rows on the device (``triton_rows``)
asks its selector for a plan as wide as the input (no host read of the kept count): the outputs
must equal the bucketed-width path's, with nothing read on the host.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import ops
from attnzoo.ops.dense import row_skipping
from attnzoo.ops.dispatch import NoBackendError, explain, make_request
from attnzoo.ops.kernels._triton import triton_reason
from attnzoo.plans import DensePlan
from attnzoo.settings import override
from attnzoo.stack import CallContext

from .conftest import assert_lse_close, make_qkv, padding_mask, rel_err
from .sync_probe import TracingProbe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(triton_reason(DEVICE) is not None,
                                  reason=f"Triton cannot run here: {triton_reason(DEVICE)}")
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 1e-2)}
TILE = 64 if DEVICE == "cpu" else 128  # the forward's query tile (the interpreter's is 64)


def _lengths(B, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(1, N, (B, H), generator=g)
    out[0, 0], out[-1, -1] = N, 0  # a head keeping every row, one keeping none
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
@pytest.mark.parametrize("backend", [pytest.param("triton_rows", marks=needs_triton), None],
                         ids=["triton_rows", "auto"])
def test_rows_before_each_length_match_the_reference(backend, per_kv_head, dtype):
    B, Hq, Hkv, N, D = 2, 4, 2, 200, 32
    q, k, v = (t.to(DEVICE) for t in make_qkv(B, Hq, Hkv, N, N, D, dtype, seed=3))
    lengths = _lengths(B, Hkv if per_kv_head else Hq, N, seed=4).to(DEVICE)
    out, lse = ops.dense(q, k, v, row_lengths=lengths, return_lse=True, backend=backend)
    ref, ref_lse = ops.reference(*(t.float() for t in (q, k, v)), DensePlan(N, N), return_lse=True)
    rows = lengths.repeat_interleave(Hq // lengths.shape[1], 1)[..., None] > torch.arange(N, device=DEVICE)
    tol_out, tol_lse = TOL[dtype]
    assert rel_err(out * rows[..., None], ref * rows[..., None]) <= tol_out
    assert_lse_close(lse.where(rows, 0.0), ref_lse.where(rows, 0.0), tol_lse)
    if backend == "triton_rows":  # a tile wholly past its head's length walked nothing: exact zeros
        skipped = torch.arange(N, device=DEVICE) >= (-(-lengths.repeat_interleave(Hq // lengths.shape[1], 1)
                                                         // TILE) * TILE)[..., None]
        assert skipped.any() and (out[skipped] == 0).all() and (lse[skipped] == float("-inf")).all()
    else:  # the CPU's trimmed run: past the longest length there is nothing
        assert (out[..., int(lengths.max()):, :] == 0).all()


def test_row_lengths_are_checked():
    q, k, v = make_qkv(1, 4, 2, 50, 50, 16)
    good = torch.full((1, 2), 10)
    with pytest.raises(TypeError, match="row_lengths must be an integer tensor"):
        ops.dense(q, k, v, row_lengths=good.float())
    with pytest.raises(ValueError, match=r"expected \[1, H\] with H dividing the 4 query heads"):
        ops.dense(q, k, v, row_lengths=torch.full((1, 3), 10))
    with pytest.raises(ValueError, match="causal self-attention"):
        ops.dense(q, k, v, causal=False, row_lengths=good)
    with pytest.raises(ValueError, match="causal self-attention"):
        ops.dense(q[:, :, :20], k, v, row_lengths=good)


@needs_triton
def test_triton_rows_serves_only_forward_calls_naming_row_lengths():
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 4, 2, 50, 50, 16))
    plain = dict(explain(make_request("dense", q, k, v, "dense", return_lse=False, key_padding_mask=None,
                                      causal=True)))
    assert "row_lengths" in plain["triton_rows"]
    with override(backend={"dense": "triton_rows"}):
        assert row_skipping(q, k)
        with pytest.raises(NoBackendError, match="no backward"):
            ops.dense(q.detach().requires_grad_(), k, v, row_lengths=torch.full((1, 2), 10, device=DEVICE))
    # chosen by itself on a GPU; never on the CPU (the interpreter is a test vehicle)
    assert row_skipping(q, k) == (DEVICE == "cuda")


def _token_stack(per_kv_head):
    small = {"name": "token_coverage", "coverage": 0.3, "window": 32, "min_tokens": 64, "per_kv_head": per_kv_head}
    return attnzoo.build({"name": "ts", "default": {"compress": small, "inner": {"op": "dense"}}})


@needs_triton
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_token_sparse_at_a_static_width_equals_the_read_width(pad, per_kv_head, monkeypatch):
    """Inner attention that skips padded rows: the plan is N wide (read from nothing) and the outputs
    equal the bucketed-width path's, batch 2 under padding."""
    from attnzoo.selectors.token_coverage import TokenCoverage

    B, N = (1 if pad == "none" else 2), 300
    q, k, v = (t.to(DEVICE) for t in make_qkv(B, 4, 2, N, N, 32, seed=5))
    kpm = padding_mask(B, N, pad)
    kpm = None if kpm is None else kpm.to(DEVICE)
    widths = []
    real = TokenCoverage.__call__

    def spy(self, q, k, ctx=None):
        plan = real(self, q, k, ctx)
        widths.append(plan.max_len)
        return plan

    monkeypatch.setattr(TokenCoverage, "__call__", spy)
    stack = _token_stack(per_kv_head)
    ctx = lambda: CallContext(layer_idx=0, key_padding_mask=kpm, starts_aligned=True)  # noqa: E731
    with override(backend={"dense": "sdpa_cuda" if DEVICE == "cuda" else "sdpa"}):  # skips no rows: width read
        want = stack(0, q, k, v, ctx())
    with override(backend={"dense": "triton_rows"}):
        got = stack(0, q, k, v, ctx())
    assert widths[0] < N and widths[-1] == N, widths
    rows = torch.ones(B, 1, N, 1, dtype=torch.bool, device=DEVICE) if kpm is None else kpm[:, None, :, None]
    assert rel_err(got * rows, want * rows) <= 1e-4


@needs_triton
def test_token_sparse_at_a_static_width_reads_nothing_on_the_host():
    q, k, v = (t.to(DEVICE) for t in make_qkv(1, 4, 2, 300, 300, 32, seed=6))
    stack = _token_stack(False)
    with override(backend={"dense": "triton_rows"}, check_values=False):
        node = stack.node_for(0)
        assert node.capture_refusal(q, k) is None
        stack(0, q, k, v, CallContext(layer_idx=0))
        with TracingProbe() as probe:
            stack(0, q, k, v, CallContext(layer_idx=0))
    assert not probe.syncs, dict(probe.sites)
    if DEVICE == "cpu":  # without a row-skipping backend (the CPU's sdpa) the width is read
        assert "width is read" in node.capture_refusal(q, k)


@needs_triton
def test_token_sparse_op_names_row_lengths_only_for_a_plan_as_wide_as_the_sequence(monkeypatch):
    """A full-width plan (sized without reading the counts) lets a backend skip each head's padded
    rows; a plan sized to the counts goes to the fastest dense kernel over its whole width."""
    from attnzoo.ops import token_sparse
    from attnzoo.plans import TokenPlan

    q, k, v = (t.to(DEVICE) for t in make_qkv(2, 4, 2, 150, 150, 32, seed=8))
    keep = torch.rand(2, 2, 150, generator=torch.Generator().manual_seed(9)).to(DEVICE) < 0.6
    seen = []
    real = token_sparse.dense
    monkeypatch.setattr(token_sparse, "dense", lambda *a, **kw: seen.append(kw["row_lengths"]) or real(*a, **kw))
    narrow = token_sparse.attention(q, k, v, TokenPlan.from_keep_mask(keep))
    with override(backend={"dense": "triton_rows"}):
        wide = token_sparse.attention(q, k, v, TokenPlan.from_keep_mask(keep, 150))
    assert seen[0] is None and torch.equal(seen[1], keep.sum(-1))
    assert rel_err(wide, narrow) <= 1e-4
