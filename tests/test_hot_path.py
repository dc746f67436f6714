"""The GPU prefill hot path: no host synchronisation, few launches per attention call.

On CUDA: a prefill of each selector-based preset under ``torch.cuda.set_sync_debug_mode("error")``
(any host sync raises) and the kernel count of one attention call from ``torch.profiler``.

On the CPU the same code path runs (values are not read on the host: ``ATTNZOO_CHECK_VALUES=0``,
as on a GPU; the Triton backends forced) with the kernels replaced by stubs that count one launch
each, under ``OpProbe``: it flags every op that would wait for a GPU (``.item()``, ``nonzero``,
boolean indexing, ...) and counts the ops that would launch a kernel.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.models import EMBEDDED_SHAPE
from attnzoo.stack import CallContext

from .sync_probe import TracingProbe

# selection + attention of one layer, per the hot-path issue
LAUNCH_BOUND = {"streaming": 25, "topk-blocks": 25, "xattention": 40, "elastic-fa-streaming": 40,
                "elastic-fa-xa": 40, "elastic-xa-streaming": 40}
B, HQ, HKV, D = 1, 9, 3, 64  # the embedded SmolLM2's attention shape
KERNELS_FORCED = "mixed=triton,block_sparse=triton,antidiagonal_scores=triton,pooled_scores=triton,block_select=triton"


def _qkv(n, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV))
    keys = torch.randn(B, n, HKV, D, generator=g).to(device, dtype)
    return q, k, v, keys


@pytest.fixture
def stub_kernels(monkeypatch):
    """Replace the Triton kernels by stubs with the wrappers' outputs; count their launches."""
    from torch.utils._python_dispatch import _disable_current_modes

    from attnzoo.ops.kernels import triton_attention, triton_pooled, triton_scores, triton_select

    launches = {"n": 0}

    def attention(q, k, v, kp, key_padding_mask, scale):
        launches["n"] += 1
        with _disable_current_modes():  # the stub's own outputs are not launches of the code under test
            return torch.zeros_like(q), torch.zeros(q.shape[:3])

    def scores(q, k, *, stride, block_size, chunk_size, key_padding_mask=None, active_heads=None):
        if active_heads is not None:
            active_heads.to(torch.int8)  # the wrapper's own torch work
        launches["n"] += 2  # the output's zero fill and the kernel
        nqb, nkb = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
        with _disable_current_modes():
            w = torch.rand(q.shape[0], q.shape[1], nqb, nkb)
        yield 0, nqb, w

    def pooled(q, k, *, block_size, chunk_size, key_padding_mask=None, masked=False, **forced):
        from attnzoo.ops.pooled import pooled_keys

        pooled_keys(k, block_size, key_padding_mask)  # the wrapper's own torch work
        launches["n"] += 2  # the output's fill and the kernel (the stats buffer is torch.empty)
        nqb, nkb = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
        with _disable_current_modes():
            return torch.rand(q.shape[0], k.shape[1], nqb, nkb)

    def select_launch(rule, s, width, tau=None, keep_all=None, last=None, n_pick=None, own_lo=None,
                      keep_sink=True, keep_diagonal=True):
        from attnzoo.ops import selection

        launches["n"] += 1  # one program per row; its outputs are torch.empty
        with _disable_current_modes():
            if rule == "by_mass":
                return selection._torch_by_mass(s, tau, keep_all, last, keep_sink, keep_diagonal)
            return selection._torch_top_n(s, n_pick, own_lo, last, width - 2)

    monkeypatch.setattr(triton_select, "_launch", select_launch)
    monkeypatch.setattr(triton_attention, "attention", attention)
    monkeypatch.setattr(triton_scores, "block_scores", scores)
    monkeypatch.setattr(triton_pooled, "pooled_scores", pooled)
    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "0")
    monkeypatch.setenv("ATTNZOO_BACKEND", KERNELS_FORCED)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return launches


@pytest.mark.parametrize("preset", list(LAUNCH_BOUND))
def test_attention_call_has_no_host_sync_and_few_launches(preset, stub_kernels):
    pytest.importorskip("triton")
    stack = attnzoo.build(f"preset:{preset}").for_model(EMBEDDED_SHAPE)
    q, k, v, keys = _qkv(4096)
    layer = 5
    ctx = lambda: CallContext(layer_idx=layer, pre_rope_keys=keys, cache={})  # noqa: E731
    stack(layer, q, k, v, ctx())  # first call: per-shape caches
    stub_kernels["n"] = 0
    with TracingProbe() as probe:
        out = stack(layer, q, k, v, ctx())
    assert out.shape == q.shape
    assert not probe.syncs, f"host syncs: {dict(probe.sites)}"
    launches = probe.launches + stub_kernels["n"]
    assert launches <= LAUNCH_BOUND[preset], f"{launches} launches: {sorted(probe.ops.items(), key=lambda x: -x[1])}"


def test_token_sparse_with_a_static_width_has_no_host_sync(stub_kernels, monkeypatch):
    """Token Sparse with ``max_keep`` (the plan's width a function of N), or the shipped one where its
    inner dense attention skips each head's padded rows (``triton_rows``, as on a GPU: the width is
    N): selection, gather, inner attention and scatter make no host read; otherwise the plan's width
    is read (on a CPU also whether anything was dropped)."""
    from attnzoo.config import load_config, preset_spec

    spec = load_config(preset_spec("token-sparse"))
    node = spec["layers"]["from:0.5"]
    capped = {**spec, "layers": {"from:0.5": {**node, "compress": {**node["compress"], "max_keep": 0.5}}}}
    q, k, v, keys = _qkv(4096)
    ctx = lambda: CallContext(layer_idx=20, pre_rope_keys=keys, cache={})  # noqa: E731
    forced = "dense=triton_rows," + KERNELS_FORCED
    # the shipped one's inner attention names row_lengths: on a GPU triton_rows serves it; here it is forced
    for cfg, reads, backends in ((capped, False, KERNELS_FORCED), (spec, False, forced), (spec, True, KERNELS_FORCED)):
        monkeypatch.setenv("ATTNZOO_BACKEND", backends)
        stack = attnzoo.build(cfg).for_model(EMBEDDED_SHAPE)
        stack(20, q, k, v, ctx())
        with TracingProbe() as probe:
            stack(20, q, k, v, ctx())
        sites = str(dict(probe.sites))
        # the selector reads the width (bucketed: plans.token.bucket_width) and, on a CPU, whether anything dropped
        assert bool(probe.syncs) == reads and ("selectors/token_coverage.py" in sites) == reads, sites
        assert probe.launches < 100, sorted(probe.ops.items(), key=lambda x: -x[1])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny_smollm_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=30,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=32768)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


# selector-based presets: no host sync at all. Routed presets may take the split path (a call per
# branch, chosen where it measured faster), which reads the router's decision: one sync per layer.
SYNCS_PER_LAYER = {"streaming": 0, "topk-blocks": 0, "xattention": 0, "token-sparse": 0, "elastic-fa-streaming": 1,
                   "elastic-fa-xa": 1, "elastic-xa-streaming": 1}


@needs_cuda
@pytest.mark.parametrize("preset", list(SYNCS_PER_LAYER))
def test_gpu_prefill_host_syncs(preset, monkeypatch):
    """Every layer's attention call of a prefill runs under sync-debug mode (only attnzoo's calls:
    transformers' own mask code syncs once per forward, outside them)."""
    import warnings

    from attnzoo.stack import LayerStack

    model = _tiny_smollm_shaped()
    ids = torch.randint(0, 256, (1, 32768), device="cuda")  # above the presets' dense_below on CUDA
    calls = {"n": 0}
    strict = {"on": False}
    inner = LayerStack.__call__
    mode = "error" if SYNCS_PER_LAYER[preset] == 0 else "warn"

    def checked(self, *args, **kwargs):
        if not strict["on"]:
            return inner(self, *args, **kwargs)
        calls["n"] += 1
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return inner(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(LayerStack, "__call__", checked)
    from attnzoo.config import load_config, preset_spec, without_dense_below

    stack = attnzoo.build(without_dense_below(load_config(preset_spec(preset))))  # token-sparse: sparse at 32K
    with attnzoo.patch(model, stack), torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: compiles, caches, path timing
        torch.cuda.synchronize()
        seen.clear()
        strict["on"] = True
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    assert calls["n"] == model.config.num_hidden_layers
    syncs = sum("called a synchronizing" in str(w.message) for w in seen)
    assert syncs <= SYNCS_PER_LAYER[preset] * calls["n"], f"{syncs} host syncs in {calls['n']} layers"


@needs_cuda
@pytest.mark.parametrize("preset", list(LAUNCH_BOUND))
def test_gpu_attention_call_kernel_count(preset):
    from torch.profiler import ProfilerActivity, profile

    stack = attnzoo.build(f"preset:{preset}")
    q, k, v, keys = _qkv(32768, "cuda", torch.bfloat16)  # above the presets' dense_below on CUDA
    ctx = lambda: CallContext(layer_idx=5, pre_rope_keys=keys, cache={})  # noqa: E731
    with torch.no_grad():
        stack(5, q, k, v, ctx())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            stack(5, q, k, v, ctx())
            torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    import collections

    names = collections.Counter(n.split("<")[0].split("(")[0][-50:] for n in kernels)
    print(f"{preset}: {len(kernels)} kernels per attention call: {dict(names)}")
    assert len(kernels) <= LAUNCH_BOUND[preset], dict(names)


def test_xattention_dense_tail_under_padding_has_no_host_sync(stub_kernels):
    """The dense tail's rows come from each sequence's end, read from the padding mask on the
    device: no host sync, two sequences ending in different blocks."""
    pytest.importorskip("triton")
    from attnzoo.context import CallContext

    sel = attnzoo.create("selector", {"name": "xattention", "stride": 8, "block_size": 64, "dense_tail": 64})
    q, k, _, _ = _qkv(4096)
    q, k = q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1)
    kpm = torch.ones(2, 4096, dtype=torch.bool)
    kpm[1, 3000:] = False
    # as the stack calls it (starts_aligned): a direct call with a mask reads it once to refuse left padding
    ctx = CallContext(key_padding_mask=kpm, starts_aligned=True)
    sel(q, k, ctx)  # first call: per-shape caches
    with TracingProbe() as probe:
        plan = sel(q, k, ctx)
    assert not probe.syncs, f"host syncs: {dict(probe.sites)}"
    full_rows = plan.kv_counts == plan.last_visible_block() + 1
    assert full_rows[0, :, -1].all() and full_rows[1, :, 3000 // 64 - 1 : 3000 // 64 + 1].all()
