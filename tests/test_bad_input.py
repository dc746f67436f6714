"""Bad input raises ValueError/TypeError naming the argument, for every op."""

from __future__ import annotations

import pytest
import torch

from attnzoo import ops
from attnzoo.ops import token_sparse

from .conftest import make_qkv, random_block_plan, random_token_plan

B, HQ, HKV, N, D = 2, 4, 2, 64, 16


def _plan():
    return random_block_plan(B, HKV, N, N, 16, 16)


OPS = {
    "reference": lambda q, k, v, **kw: ops.reference(q, k, v, **kw),
    "dense": lambda q, k, v, **kw: ops.dense(q, k, v, **kw),
    "block_sparse": lambda q, k, v, **kw: ops.block_sparse(q, k, v, _plan(), **kw),
}


def _qkv():
    return make_qkv(B, HQ, HKV, N, N, D)


def _case(name):
    q, k, v = _qkv()
    cases = {
        "rank": ((q[0], k, v), {}, ValueError, r"q must be \[B, H, N, D\]"),
        "type": ((q.numpy(), k, v), {}, TypeError, "q must be a torch.Tensor"),
        "gqa": ((q[:, :3], k, v), {}, ValueError, "multiple of k/v heads"),
        "head_dim": ((q[..., :8], k, v), {}, ValueError, "head dim mismatch"),
        "dtype_int": ((q.long(), k.long(), v.long()), {}, TypeError, "q dtype must be one of"),
        "dtype_mix": ((q, k.double(), v), {}, TypeError, "share a dtype|k dtype"),
        "device": ((q, k.to("meta"), v), {}, ValueError, "share a device|k is on the meta device"),
        "meta": ((q.to("meta"), k.to("meta"), v.to("meta")), {}, ValueError, "q is on the meta device"),
        "causal_none": ((q, k, v), {"causal": None}, TypeError, "causal must be True or False"),
        "causal_str": ((q, k, v), {"causal": "yes"}, TypeError, "causal must be True or False"),
        "kv_shape": ((q, k, v[:, :, :10]), {}, ValueError, "same shape"),
        "batch": ((q, k[:1], v[:1]), {}, ValueError, "batch"),
        "nan": ((q.clone().fill_(float("nan")), k, v), {}, ValueError, "q contains NaN"),
        "inf": ((q, k, v.clone().fill_(float("inf"))), {}, ValueError, "v contains NaN or Inf"),
        "kpm_dtype": ((q, k, v), {"key_padding_mask": torch.ones(B, N)}, TypeError, "key_padding_mask must be a bool"),
        "kpm_shape": ((q, k, v), {"key_padding_mask": torch.ones(B, N + 1, dtype=torch.bool)}, ValueError,
                      r"key_padding_mask must be \[B, Nk\]"),
        "scale_neg": ((q, k, v), {"scale": -1.0}, ValueError, "scale must be a finite positive"),
        "scale_type": ((q, k, v), {"scale": "big"}, TypeError, "scale must be a float"),
        "empty": ((q[:, :, :0], k, v), {}, ValueError, "empty input"),
    }
    return cases[name]


NAMES = ["rank", "type", "gqa", "head_dim", "dtype_int", "dtype_mix", "device", "meta", "kv_shape", "batch",
         "nan", "inf", "kpm_dtype", "kpm_shape", "scale_neg", "scale_type", "empty"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("op", list(OPS))
def test_bad_input_raises_naming_argument(op, name):
    if op == "reference" and name in ("nan", "inf"):
        pass  # the reference checks too: nothing is silently wrong anywhere
    args, kw, exc, match = _case(name)
    with pytest.raises(exc, match=match):
        OPS[op](*args, **kw)


def test_causal_needs_nk_at_least_nq():
    q, k, v = make_qkv(1, 2, 2, 10, 5, 8)
    with pytest.raises(ValueError, match="Nk >= Nq"):
        ops.dense(q, k, v)
    ops.dense(q, k, v, causal=False)  # non-causal cross attention is fine


def test_nan_check_can_be_disabled(monkeypatch):
    q, k, v = _qkv()
    q[0, 0, 0, 0] = float("nan")
    monkeypatch.setenv("ATTNZOO_CHECK_FINITE", "0")
    out = ops.dense(q, k, v)  # documented: NaN propagates when the check is off
    assert torch.isnan(out[0, 0, 0]).any()


def test_wrong_plan_type_and_shape():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="plan must be a BlockPlan"):
        ops.block_sparse(q, k, v, random_token_plan(B, HQ, N))
    with pytest.raises(ValueError, match="heads"):
        ops.block_sparse(q, k, v, random_block_plan(B, 3, N, N, 16, 16))
    with pytest.raises(ValueError, match="q_len=32"):
        ops.block_sparse(q, k, v, random_block_plan(B, HQ, 32, 32, 16, 16))
    with pytest.raises(ValueError, match="plan is on"):
        p = _plan()
        ops.block_sparse(q, k, v, type(p)(p.kv_indices.to("meta"), p.kv_counts.to("meta"), 16, 16, N, N))
    with pytest.raises(ValueError, match="self-attention"):
        token_sparse.compress(q[:, :, :32], k, v, random_token_plan(B, HQ, N))


@pytest.mark.parametrize("name", ["causal_none", "causal_str"])
@pytest.mark.parametrize("op", ["reference", "dense"])
def test_causal_must_be_a_bool(op, name):
    # causal=None used to run non-causal attention silently; causal="yes" failed inside aten
    args, kw, exc, match = _case(name)
    with pytest.raises(exc, match=match):
        OPS[op](*args, **kw)


def test_selector_given_a_rank3_q_names_it():
    from attnzoo import create

    q, k, _ = _qkv()
    for name in ("xattention", "streaming", "topk_blocks", "token_coverage"):
        sel = create("selector", name)
        with pytest.raises(ValueError, match=r"q must be \[B, H, N, D\]"):
            sel(q[0], k)


def test_block_plan_full_checks_its_sizes():
    from attnzoo.plans import BlockPlan

    for kw, match in (({"block_q": 0}, "block_q must be >= 1"), ({"block_k": -4}, "block_k must be >= 1"),
                      ({"q_len": 1.5}, "q_len must be an int")):
        args = {"batch": 1, "heads": 1, "q_len": 8, "kv_len": 8, "block_q": 4, "block_k": 4, **kw}
        with pytest.raises((ValueError, TypeError), match=match):
            BlockPlan.full(**args)


def test_decompress_validates_its_plan():
    from attnzoo.plans import TokenPlan

    plan = random_token_plan(B, HQ, N)
    out = torch.zeros(B, HQ, plan.max_len, D)
    bad = TokenPlan(plan.indices.clone().fill_(N + 7), plan.lengths, N)  # out of range
    with pytest.raises(ValueError, match=r"indices out of range"):
        token_sparse.decompress(out, bad, N)
    down = torch.arange(N - 1, N - 1 - plan.max_len, -1).expand(B, HQ, -1)
    desc = TokenPlan(down.contiguous(), plan.lengths.clone().fill_(plan.max_len), N)
    with pytest.raises(ValueError, match="strictly ascending"):
        token_sparse.decompress(out, desc, N)
    with pytest.raises(TypeError, match="plan must be a TokenPlan"):
        token_sparse.decompress(out, "plan", N)
    with pytest.raises(ValueError, match=r"lse must be a tensor \[B, Hq, N'\]"):
        token_sparse.decompress(out, plan, N, lse=torch.zeros(1))


def test_invalid_yaml_is_a_config_error_naming_the_file(tmp_path):
    import attnzoo

    path = tmp_path / "stack.yaml"
    path.write_text("name: broken\ndefault: {op: dense\n")
    with pytest.raises(attnzoo.ConfigError, match=r"stack\.yaml: invalid YAML at line \d+"):
        attnzoo.build(str(path))
    with pytest.raises(attnzoo.ConfigError, match="YAML text: invalid YAML"):
        attnzoo.build("default: [op: dense\n")


def test_table_router_row_for_a_missing_layer_is_rejected_at_patch():
    import attnzoo

    from .test_left_padding import _tiny_llama

    model = _tiny_llama()  # 2 layers
    stack = {"name": "t", "default": {"router": {"name": "table", "default": "full", "heads": {7: ["full", "full"]}},
                                      "branches": {"full": {"op": "dense"}}}}
    with pytest.raises(ValueError, match=r"heads lists layer\(s\) \[7\], but the model has 2 layers"):
        with attnzoo.patch(model, stack):
            pass


def test_unknown_op_backend_fails_at_build():
    import attnzoo

    with pytest.raises(ValueError, match=r"backend 'blockd' is not a backend of op 'block_sparse' \(did you mean "
                                         r"'blocked'\?\)"):
        attnzoo.build({"default": {"selector": "streaming", "op": {"name": "block_sparse", "backend": "blockd"}}})


def test_misspelled_op_in_attnzoo_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("ATTNZOO_BACKEND", "blocksparse=blocked")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"ATTNZOO_BACKEND names op 'blocksparse'.*did you mean 'block_sparse'"):
        ops.dense(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_exact(dtype):
    """The one-sum NaN/Inf scan: one bad element anywhere is found, and finite values whose sum
    overflows (the fast path's only false alarm) are still accepted through the exact scan."""
    from attnzoo.ops._checks import all_finite

    big = torch.finfo(dtype).max
    x = torch.randn(2, 3, 17, 8).to(dtype)
    assert all_finite(x)
    assert all_finite(torch.full((4, 1000), big, dtype=dtype))  # sum overflows, every value finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 16, 7] = bad
        assert not all_finite(y), bad
    z = x.clone()
    z[0, 0, 0, 0], z[1, 1, 1, 1] = float("inf"), -float("inf")  # the sum is NaN, not a cancellation
    assert not all_finite(z)
