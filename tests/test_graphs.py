"""CUDA-graph replay of layer calls (attnzoo.stack.graphs): the same outputs and densities as the
eager call, under padding and batch > 1; calls that cannot be captured run eagerly and say why."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.config import load_config, preset_spec, without_dense_below
from attnzoo.models import EMBEDDED_SHAPE
from attnzoo.settings import override
from attnzoo.stack import CallContext, DensityMeter

from .conftest import padding_mask

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
HQ, HKV, D = 9, 3, 64


def _stack(preset):
    """A shipped preset, sparse at every length; ``token-sparse-capped``: Token Sparse with a static
    width (``max_keep``; the shipped one reads its plan's width, which cannot be captured)."""
    spec = without_dense_below(load_config(preset_spec(preset.removesuffix("-capped"))))
    if preset.endswith("-capped"):
        node = spec["layers"]["from:0.5"]
        spec["layers"]["from:0.5"] = {**node, "compress": {**node["compress"], "max_keep": 0.5}}
    return attnzoo.build(spec).for_model(EMBEDDED_SHAPE)


def _inputs(B, N, seed, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV))
    keys = torch.randn(B, N, HKV, D, generator=g).to(device, dtype)
    return q, k, v, keys


def test_graphs_are_off_on_the_cpu_and_by_default():
    stack = _stack("streaming")
    q, k, v, keys = _inputs(1, 512, 0, "cpu", torch.float32)
    with override(cuda_graphs=True):
        stack(5, q, k, v, CallContext(layer_idx=5, pre_rope_keys=keys))
    assert stack.graphs.report() == [], "a CPU call never reaches the graphs"
    import copy
    import pickle

    assert isinstance(copy.deepcopy(stack).graphs, type(stack.graphs))
    assert pickle.loads(pickle.dumps(stack.graphs)).report() == []


def test_nodes_declare_what_cannot_be_captured(monkeypatch):
    from attnzoo.stack import routed

    q, k, _, _ = _inputs(1, 4096, 0, "cpu", torch.float32)
    with override(check_values=False):
        assert _stack("xattention").node_for(20).capture_refusal(q, k) is None
        assert _stack("token-sparse-capped").node_for(20).capture_refusal(q, k) is None
        assert "width is read" in _stack("token-sparse").node_for(20).capture_refusal(q, k)
        # no single-launch backend for these shapes on a CPU: the split path, which reads the decision
        assert "split path" in _stack("elastic-fa-streaming").node_for(20).capture_refusal(q, k)
        reuse = attnzoo.build({"name": "r", "default": {
            "selector": {"name": "streaming"}, "op": "block_sparse",
            "decode": {"selector": {"name": "prefill_blocks"}, "op": "block_sparse"}}})
        assert "kept in ctx.cache" in reuse.node_for(0).capture_refusal(q, k)
    with override(check_values=False), monkeypatch.context() as m:  # where one mixed launch can serve it
        m.setattr(routed, "fused_backend", lambda *a, **kw: object())
        assert _stack("elastic-fa-streaming").node_for(20).capture_refusal(q, k) is None
        assert _stack("elastic-fa-xa").node_for(20).capture_refusal(q, k) is None
    with override(check_values=True):
        assert "value checks" in _stack("xattention").node_for(20).capture_refusal(q, k)
    qd, kd = (t.to("cuda" if torch.cuda.is_available() else "cpu") for t in (q, k))  # Triton: a GPU or the interpreter
    with override(check_values=False, backend={"dense": "triton_rows"}):  # as on a GPU
        assert _stack("token-sparse").node_for(20).capture_refusal(qd, kd) is None
        assert "width is read" in _stack("token-sparse-xattention").node_for(20).capture_refusal(qd, kd)


def test_one_dense_launch_is_not_worth_a_graph():
    """Dense layers, and sparse ones below their ``dense_below``, are one attention launch: the
    graphs leave them eager (a replay would add its input copies and save nothing)."""
    from types import SimpleNamespace

    q, k, _, _ = _inputs(1, 4096, 0, "cpu", torch.float32)
    # a CUDA key of 4K tokens, as dense_below reads it (its length and device type), on any machine
    k_cuda = SimpleNamespace(shape=k.shape, device=torch.device("cuda"))
    assert attnzoo.build(load_config(preset_spec("full"))).for_model(EMBEDDED_SHAPE).node_for(20).launches_once(q, k)
    assert _stack("xattention").node_for(0).launches_once(q, k), "the preset's first layers are dense"
    for name in ("streaming", "xattention", "topk-blocks", "token-sparse", "elastic-fa-xa"):
        shipped = attnzoo.build(load_config(preset_spec(name))).for_model(EMBEDDED_SHAPE).node_for(20)
        assert shipped.launches_once(q, k_cuda), f"{name}: below its CUDA crossover the layer runs dense"
        assert not shipped.launches_once(q, k), f"{name}: no crossover on the CPU"
        assert not _stack(name).node_for(20).launches_once(q, k_cuda), f"{name} sparse everywhere is captured"
    phased = attnzoo.build({"name": "p", "default": {"op": "dense", "decode": {
        "selector": {"name": "quest", "budget": 1024}, "op": "block_sparse"}}})
    assert phased.node_for(0).launches_once(q, k), "graphs serve prefills: the prefill part decides"


def test_what_a_captured_call_keeps_is_handed_out_as_a_copy():
    """A router's decision kept in ctx.cache by a captured call lives in the graph's memory: the
    caller gets a clone after each replay; anything but tensors and plain fields is not captured."""
    from attnzoo.plans import HeadPlan
    from attnzoo.stack.graphs import _copied

    plan = HeadPlan(torch.tensor([[0, 1, 0]]), ("full", "xa"))
    got = _copied(plan)
    assert isinstance(got, HeadPlan) and got.labels == plan.labels and torch.equal(got.branch, plan.branch)
    assert got.branch.data_ptr() != plan.branch.data_ptr()
    assert _copied(torch.ones(2)).tolist() == [1.0, 1.0]
    assert _copied({"a": torch.ones(1)}) is None and _copied(lambda: 0) is None


@needs_cuda
@pytest.mark.parametrize("preset", ["streaming", "xattention", "topk-blocks", "token-sparse", "token-sparse-capped",
                                    "token-sparse-xattention-capped", "elastic-fa-xa", "elastic-fa-streaming"])
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_replay_equals_eager(preset, pad):
    """Third call of a signature replays its graph: output and metered density equal the eager
    call's on the same inputs, for new inputs each time (the buffers are refilled, not stale)."""
    stack = _stack(preset)
    layer = 20  # sparse in every preset listed (Token Sparse runs in the second half)
    B, N = (1 if pad == "none" else 2), 4096 + 37
    kpm = padding_mask(B, N, pad)
    kpm = None if kpm is None else kpm.cuda()

    def call(seed, graphs):
        q, k, v, keys = _inputs(B, N, seed)
        meter = DensityMeter()
        with override(cuda_graphs=graphs), torch.no_grad():
            out = stack(layer, q, k, v, CallContext(layer_idx=layer, pre_rope_keys=keys, key_padding_mask=kpm,
                                                    meter=meter))
        return out, meter.mean()

    kept = []
    for seed in range(4):  # calls 1 (eager), 2 (capture + replay), 3-4 (replay)
        got, got_density = call(seed, True)
        want, want_density = call(seed, False)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        assert abs(got_density - want_density) < 1e-6 and got_density < 1.0
        kept.append((got, got.clone()))
    for got, at_return in kept:  # what a replay returned is the caller's: later replays leave it alone
        assert torch.equal(got, at_return)
    (entry,) = stack.graphs.report()
    assert entry["state"] == "graph" and entry["calls"] == 4, entry


@needs_cuda
def test_a_dense_layer_runs_eagerly_with_graphs_on():
    from attnzoo.stack.graphs import ONE_LAUNCH

    stack = attnzoo.build(load_config(preset_spec("full"))).for_model(EMBEDDED_SHAPE)
    q, k, v, keys = _inputs(1, 4096, 0)
    with override(cuda_graphs=True), torch.no_grad():
        outs = [stack(5, q, k, v, CallContext(layer_idx=5, pre_rope_keys=keys)) for _ in range(3)]
    assert [e["state"] for e in stack.graphs.report()] == [ONE_LAUNCH]
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)


@needs_cuda
def test_a_call_that_reads_the_host_runs_eagerly_and_says_why(monkeypatch):
    from attnzoo.stack import nodes

    stack = _stack("streaming")
    q, k, v, keys = _inputs(1, 4096, 0)
    real = nodes.Branch.__call__

    def reading(self, q, k, v, ctx):
        out = real(self, q, k, v, ctx)
        float(out[0, 0, 0, 0])  # a host read: cannot be captured
        return out

    monkeypatch.setattr(nodes.Branch, "__call__", reading)
    with override(cuda_graphs=True), torch.no_grad():
        outs = [stack(5, q, k, v, CallContext(layer_idx=5, pre_rope_keys=keys)) for _ in range(3)]
    (entry,) = stack.graphs.report()
    assert entry["state"].startswith("capture failed"), entry
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=0, rtol=0)
    # the failed capture left no trace: the caller's stream, random numbers on the device, and the
    # allocator (the next capture, of another layer, succeeds)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randint(0, 10, (4,), device="cuda")
    monkeypatch.undo()
    with override(cuda_graphs=True), torch.no_grad():
        for _ in range(3):
            stack(6, q, k, v, CallContext(layer_idx=6, pre_rope_keys=keys))
    assert [e["state"] for e in stack.graphs.report() if e["layer"] == 6] == ["graph"]


@needs_cuda
def test_token_sparse_over_an_inner_selector_reads_its_width_and_runs_eagerly():
    """The shipped Token Sparse is captured (its inner dense attention skips each head's padded rows,
    so the plan is N wide); over XAttention the kept count sizes the plan, read on the host."""
    stack = _stack("token-sparse-xattention")
    q, k, v, keys = _inputs(1, 4096, 0)
    with override(cuda_graphs=True), torch.no_grad():
        outs = [stack(20, q, k, v, CallContext(layer_idx=20, pre_rope_keys=keys)) for _ in range(3)]
    (entry,) = stack.graphs.report()
    assert entry["state"].startswith("the compressed width is read on the host"), entry
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)


@needs_cuda
def test_whole_prefill_with_graphs_equals_eager():
    """A model's prefill through the patched stack, graphs on vs off (same logits within bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    stack = attnzoo.build(without_dense_below(load_config(preset_spec("xattention"))))
    ids = torch.randint(0, 256, (2, 4096), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    with attnzoo.patch(model, stack), torch.no_grad():
        with override(cuda_graphs=False):
            want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with override(cuda_graphs=True):
            for _ in range(3):
                got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_a_routed_layer_keeps_its_split_path_under_graphs_only_where_it_wins_by_what_a_replay_saves():
    from attnzoo.stack.routed import GRAPH_REPLAY_SAVES_MS, pick_path

    short = {"mixed": 0.8, "split": 0.6, "hybrid": 0.7}  # 16K-like: the split path is faster, eagerly
    assert pick_path(short, graphs=False) == "split"
    assert pick_path(short, graphs=True) == "mixed", "replayed, the mixed launch saves its host time"
    long = {"mixed": 48.0, "split": 20.0}  # 128K-like: the mixed launch's dense heads cost more than SDPA
    assert pick_path(long, graphs=True) == "split"
    assert pick_path({"mixed": 1.0, "split": 0.95}, graphs=False) == "mixed", "a sync path must win by a margin"
    assert pick_path({"split": 3.0}, graphs=True) == "split", "no mixed launch: nothing to prefer"
    edge = {"mixed": 5.0, "split": 5.0 - GRAPH_REPLAY_SAVES_MS - 0.01}  # (and 10 % faster)
    assert pick_path(edge, graphs=True) == "split"
