"""Dispatch: capability declarations, first fit, forcing, and the reasons it gives."""

from __future__ import annotations

import pytest
import torch

from attnzoo import ops
from attnzoo.cli import info_text, main
from attnzoo.ops import dispatch
from attnzoo.ops.dispatch import NoBackendError, Request

from .conftest import make_qkv, random_block_plan


def _req(**kw):
    base = dict(op="block_sparse", device="cpu", dtype=torch.float32, head_dim=64, plan_kind="block",
                q_len=8192, kv_len=8192, q_heads=8, kv_heads=2)
    base.update(kw)
    return Request(**base)


def test_every_backend_declares_tolerances_for_its_dtypes():
    for b in dispatch.backends():
        for dt in b.dtypes:
            tol = b.tolerance(dt)
            assert 0 < tol.out <= 0.05 and 0 < tol.grad <= 0.1


def test_flex_is_opt_in_on_cpu(monkeypatch):
    """Unset, ATTNZOO_FLEX_MIN_LEN leaves every CPU block-sparse call to blocked, saying why;
    forcing flex still runs it; a value that is not a number of keys is refused by name."""
    monkeypatch.delenv("ATTNZOO_FLEX_MIN_LEN", raising=False)
    req = _req(plan_density=0.1, plan_heads=8, block_size=(64, 64), kv_len=4096, q_len=4096)
    assert dispatch.choose(req).name == "blocked"
    assert "opt-in" in dict(dispatch.explain(req))["flex"]
    assert dispatch.choose(req, backend="flex").name == "flex"
    monkeypatch.setenv("ATTNZOO_FLEX_MIN_LEN", "4096")
    assert dispatch.choose(req).name == "flex"
    monkeypatch.setenv("ATTNZOO_FLEX_MIN_LEN", "4k")
    with pytest.raises(ValueError, match="ATTNZOO_FLEX_MIN_LEN"):
        dispatch.choose(req)


def test_first_fit_prefers_flex_where_it_measured_faster(monkeypatch):
    monkeypatch.setenv("ATTNZOO_FLEX_MIN_LEN", "4096")
    assert dispatch.choose(_req()).name == "flex"
    assert dispatch.choose(_req(plan_density=0.1)).name == "flex"
    assert dispatch.choose(_req(plan_density=0.5)).name == "blocked"
    assert dispatch.choose(_req(kv_len=16384, q_len=16384)).name == "blocked"
    # a preference is not a capability: forcing flex on a short dense-ish plan still runs it
    assert dispatch.choose(_req(kv_len=100, q_len=100, plan_density=0.9), backend="flex").name == "flex"
    assert dispatch.choose(_req(needs_grad=True)).name == "blocked"
    assert dispatch.choose(_req(needs_lse=True)).name == "blocked"
    assert dispatch.choose(_req(has_padding=True)).name == "blocked"
    assert dispatch.choose(_req(kv_len=1000, q_len=1000)).name == "blocked"


def test_flex_bound_follows_the_plan_row_size(monkeypatch):
    """Opted in: blocked's CPU forward is slow on rows of few queries (a plan per query head, block
    64), so flex takes those up to density 0.35 at 4K-6K keys; rows of a KV head's 4 x 64 queries
    only up to 0.15, and so does everything at 8K (bench/cpu_flex_vs_blocked.py); blocks under 64
    tokens never (bench/cpu_attention_calls.py on the shipped selectors' plans)."""
    monkeypatch.setenv("ATTNZOO_FLEX_MIN_LEN", "4096")
    per_q = dict(plan_heads=8, block_size=(64, 64), kv_len=4096, q_len=4096)
    per_kv = dict(per_q, plan_heads=2)
    assert dispatch.choose(_req(plan_density=0.3, **per_q)).name == "flex"
    assert dispatch.choose(_req(plan_density=0.4, **per_q)).name == "blocked"
    assert dispatch.choose(_req(plan_density=0.3, **per_kv)).name == "blocked"
    assert dispatch.choose(_req(plan_density=0.1, **per_kv)).name == "flex"
    assert dispatch.choose(_req(plan_density=0.3, **{**per_q, "kv_len": 8192, "q_len": 8192})).name == "blocked"
    reason = dict(dispatch.explain(_req(plan_density=0.3, **per_kv)))["flex"]
    assert "rows of 256 queries" in reason, reason
    small_blocks = dict(per_q, block_size=(16, 16))
    assert dispatch.choose(_req(plan_density=0.1, **small_blocks)).name == "blocked"
    assert "< 64 tokens" in dict(dispatch.explain(_req(plan_density=0.1, **small_blocks)))["flex"]


def test_reasons_name_every_backend():
    reasons = dict(dispatch.explain(_req(needs_grad=True, dtype=torch.float16)))
    assert reasons["flex"].startswith("dtype") and reasons["blocked"] is None
    with pytest.raises(NoBackendError) as e:
        dispatch.choose(_req(plan_kind="token"))
    msg = str(e.value)
    assert "flex:" in msg and "blocked:" in msg and "plan kind 'token'" in msg


def test_every_reason_is_listed_not_only_the_first():
    req = _req(dtype=torch.float16, plan_kind="token", needs_lse=True)
    flex = {b.name: b for b in dispatch.backends("block_sparse")}["flex"]
    reasons = flex.reasons(req)
    assert any(r.startswith("dtype") for r in reasons) and any("plan kind 'token'" in r for r in reasons)
    assert flex.why_not(req) == "; ".join(reasons)
    with pytest.raises(NoBackendError) as e:
        dispatch.choose(req)
    assert "dtype" in str(e.value) and "plan kind 'token'" in str(e.value)


def test_cuda_request_declined_on_this_machine_with_reason():
    if torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    with pytest.raises(NoBackendError, match="flex: device cuda"):
        dispatch.choose(_req(device="cuda", plan_kind="token"))


def test_forcing_by_argument_and_environment(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8)
    plan = random_block_plan(1, 2, 64, 64, 16, 16)
    with pytest.raises(ValueError, match="did you mean 'blocked'"):
        ops.block_sparse(q, k, v, plan, backend="blockd")
    with pytest.raises(NoBackendError, match="forced backend 'flex'.*does not return lse"):
        ops.block_sparse(q, k, v, plan, backend="flex", return_lse=True)
    monkeypatch.setenv("ATTNZOO_BACKEND", "block_sparse=nope")
    with pytest.raises(ValueError, match="'nope' is not registered"):
        ops.block_sparse(q, k, v, plan)
    monkeypatch.setenv("ATTNZOO_BACKEND", "dense=sdpa,block_sparse=blocked")
    ops.block_sparse(q, k, v, plan)
    monkeypatch.setenv("ATTNZOO_BACKEND", "garbage")
    with pytest.raises(ValueError, match="op=backend"):
        ops.dense(q, k, v)


def test_register_backend_rejects_duplicates():
    b = dispatch.backends("dense")[0]
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register_backend(b)
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.backends("nope")


def test_info_lists_backends_and_reasons(capsys):
    text = info_text()
    for line in ("dense/sdpa", "block_sparse/blocked", "block_sparse/flex", "torch"):
        assert line in text
    if not torch.cuda.is_available():
        assert "cuda  unavailable: no CUDA device" in text
    assert main(["info"]) == 0
    assert "backends" in capsys.readouterr().out
    # the dispatch order line of each op is the registry's order, which choose() walks
    for op in ("dense", "block_sparse", "mixed", "head_router"):
        order = " > ".join(b.name for b in dispatch.backends(op))
        assert f"  {op:<20} {order}" in text


def test_dispatch_order_is_the_priority_table():
    """Precedence lives in one table (dispatch.PRIORITY); import and registration order do not
    move it, and a backend the table does not name goes after the built-ins."""
    for op, order in dispatch.PRIORITY.items():
        names = [b.name for b in dispatch.backends(op)]
        assert names == [n for n in order if n in names], op
    extra = dispatch.Backend(op="dense", name="mine", fn=lambda *a, **k: None, devices=("cpu",),
                             dtypes=(torch.float32,), plan_kinds=("dense",), backward=False, lse=False)
    try:
        dispatch.register_backend(extra)
        assert [b.name for b in dispatch.backends("dense")][-1] == "mine"
    finally:
        dispatch._BACKENDS["dense"].remove(extra)
        dispatch._CHOSEN.clear()


def test_flex_density_limits_hold_with_value_checks_off(monkeypatch):
    """ATTNZOO_CHECK_VALUES=0 turns off host reads of tensor values, not dispatch's density limits:
    the plan's density used to be passed only with value checks on, so with both switches set a
    dense plan went to flex where blocked measured faster."""
    from attnzoo import ops
    from attnzoo.plans import BlockPlan

    monkeypatch.setenv("ATTNZOO_FLEX_MIN_LEN", "256")
    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "0")
    chosen = []
    real = dispatch.choose
    import sys

    monkeypatch.setattr(sys.modules["attnzoo.ops.block_sparse"], "choose",  # the module, not ops.block_sparse
                        lambda req, backend=None: chosen.append(req) or real(req, backend))
    q, k, v = (torch.randn(1, h, 512, 64) for h in (8, 2, 2))
    ops.block_sparse(q, k, v, BlockPlan.full(1, 2, 512, 512, 64, 64))  # every causal block: density 1
    assert chosen[-1].plan_density == pytest.approx(1.0)
    assert real(chosen[-1]).name == "blocked"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("op", ["dense", "block_sparse", "mixed"])
@pytest.mark.parametrize("head_dim", [8, 64, 80, 96])
def test_every_attention_call_has_a_backend_on_each_device(op, device, head_dim):
    """The GPU fuzz found dense on CUDA with head dim 8 and lse (or padding at prefill) had no
    backend: SDPA has no lse, Triton takes 16/32/64/128/256. Every call a model can make -- any head
    dim, padding, lse, gradients, each dtype -- must have a backend whose only possible reason to
    decline is that this machine lacks the device."""
    kind = {"dense": "dense", "block_sparse": "block", "mixed": "mixed"}[op]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        req = _req(op=op, device=device, dtype=dtype, head_dim=head_dim, plan_kind=kind, needs_grad=True,
                   needs_lse=True, has_padding=True, q_len=300, kv_len=300)
        takers = [b.name for b in dispatch.backends(op)
                  if all(r == b.available() or "not available" in r or "CUDA" in r for r in b.reasons(req))]
        assert takers, f"{op} on {device}, head dim {head_dim}, {dtype}: {dispatch.explain(req)}"
