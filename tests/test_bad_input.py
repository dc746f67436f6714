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
        "device": ((q, k.to("meta"), v), {}, ValueError, "share a device"),
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


NAMES = ["rank", "type", "gqa", "head_dim", "dtype_int", "dtype_mix", "device", "kv_shape", "batch",
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
