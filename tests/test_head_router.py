"""The Elastic router's forward as an op: the torch reference against the module, the Triton kernel
(on CUDA, or on CPU under the interpreter) against the torch reference, and who declines what."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops import dispatch
from attnzoo.ops.head_router import head_router, mlp_logits, pool_keys
from attnzoo.ops.kernels._triton import triton_reason
from attnzoo.routers.elastic import ElasticRouter, ElasticRouterLayer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(triton_reason(DEVICE) is not None,
                                  reason=f"Triton cannot run here: {triton_reason(DEVICE)}")


def _layer(d, seed=0):
    torch.manual_seed(seed)
    return ElasticRouterLayer(d).to(DEVICE)


def _keys(B, N, H, D, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, H, D, generator=g).to(DEVICE, dtype)


def test_torch_backend_is_the_module_on_pooled_keys():
    mod = _layer(16)
    keys = _keys(2, 250, 3, 16)
    want = mod(pool_keys(keys, 100, dtype=torch.float32))
    got = head_router(keys, mod.weights(), pool_tokens=100, backend="torch")
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert torch.equal(mlp_logits(pool_keys(keys, 100, dtype=torch.float32), mod.weights()), got)


@needs_triton
@pytest.mark.parametrize("B,N,H,D,P", [(1, 300, 3, 64, 100), (3, 97, 8, 32, 20), (2, 64, 2, 16, 32),
                                       (2, 50, 2, 16, 32), (1, 20, 2, 16, 32)],
                         ids=["smollm2-shaped", "two-programs", "windows-touch", "windows-overlap", "shorter-than-P"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_router_matches_torch(B, N, H, D, P, dtype):
    mod = _layer(D, seed=B)
    keys = _keys(B, N, H, D, dtype, seed=N)
    want = head_router(keys, mod.weights(), pool_tokens=P, backend="torch")
    with torch.no_grad():
        got = head_router(keys, mod.weights(), pool_tokens=P, backend="triton")
    assert got.shape == (B, H, 2) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().max()
    margin = (want[..., 1] - want[..., 0]).abs()
    clear = margin > 1e-3  # the hard decision agrees wherever it is not a near-tie
    assert torch.equal((got[..., 1] > got[..., 0])[clear], (want[..., 1] > want[..., 0])[clear])


@needs_triton
def test_triton_router_reads_strided_keys():
    """Pre-RoPE keys arrive as a view of k_proj's output; the kernel reads them through strides."""
    mod = _layer(32)
    base = _keys(2, 240, 4, 64, seed=3)
    keys = base[..., :32]  # last dim contiguous, row stride 64
    want = head_router(keys, mod.weights(), pool_tokens=50, backend="torch")
    with torch.no_grad():
        got = head_router(keys, mod.weights(), pool_tokens=50, backend="triton")
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)


def test_triton_router_declines_what_it_does_not_do():
    mod = _layer(16)
    keys = _keys(1, 120, 2, 16)
    k = keys.transpose(1, 2)
    triton_b = {b.name: b for b in dispatch.backends("head_router")}["triton"]

    def why(**kw):
        req = dispatch.make_request("head_router", k, k, k, "head", return_lse=False, causal=False,
                                    key_padding_mask=kw.get("kpm"))
        if kw.get("grad"):
            import dataclasses
            req = dataclasses.replace(req, needs_grad=True)
        return triton_b.why_not(req, forced=True)

    if triton_reason(DEVICE) is None:
        assert why() is None
    assert why(kpm=torch.ones(1, 120, dtype=torch.bool, device=DEVICE)) is not None
    assert why(grad=True) is not None
    # with gradients to the weights (training), the automatic choice is the torch path
    out = head_router(keys, mod.weights(), pool_tokens=50)
    out.sum().backward()
    assert mod.task[0].weight.grad is not None


def test_bad_weights_name_the_argument():
    mod = _layer(16)
    keys = _keys(1, 120, 2, 16)
    with pytest.raises(ValueError, match=r"weights\[2\] must have shape"):
        w = list(mod.weights())
        w[2] = w[2][:, :10]
        head_router(keys, w, pool_tokens=50)
    with pytest.raises(ValueError, match="keys must be"):
        head_router(keys[0], mod.weights(), pool_tokens=50)


def test_router_uses_the_op_and_decides_like_the_reference():
    r = ElasticRouter(head_dim=16, seed=3)
    keys = _keys(2, 300, 3, 16)
    z = r.logits(keys, 4)
    mod = r.layer(4)
    want = mod(pool_keys(keys, r.pool_tokens, dtype=torch.float32))
    assert torch.allclose(z, want, atol=2e-5, rtol=1e-5)
