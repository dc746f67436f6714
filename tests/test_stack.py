"""Stacks: building from configs (with errors that name the path), node semantics, round trips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import attnzoo
from attnzoo import ops
from attnzoo.config import ConfigError, preset_names
from attnzoo.plans import HeadPlan
from attnzoo.registry import unregister
from attnzoo.routers.elastic import ElasticRouter
from attnzoo.stack import CallContext, Routed, build

from .conftest import make_qkv, padding_mask, rel_err

STREAM = {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"}
XATTN = {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.8}, "op": "block_sparse"}


def _routed(router, **branches):
    return attnzoo.build({"name": "t", "default": {"router": router, "branches": branches}}).default


@pytest.fixture
def fixed_router():
    """A router that returns a given [B, Hkv] assignment (to test Routed against per-head runs)."""

    @attnzoo.register("router", "fixed_for_test")
    @dataclass
    class Fixed:
        assignment: list[list[int]]
        needs_pre_rope_keys: ClassVar[bool] = False

        def check_labels(self, labels, path):
            pass

        def __call__(self, q, k, ctx, labels):
            return HeadPlan(torch.tensor(self.assignment), labels)

    yield Fixed
    unregister("router", "fixed_for_test")


@pytest.mark.parametrize("max_runs", [4, 0], ids=["head-runs-as-views", "gathered-pairs"])
@pytest.mark.parametrize("pad", ["none", "right"])
def test_routed_equals_each_head_running_its_own_branch(fixed_router, pad, max_runs, setting):
    setting(max_head_runs=max_runs)
    B, Hq, Hkv, N = 3, 6, 3, 150
    q, k, v = make_qkv(B, Hq, Hkv, N, N, 16, seed=2)
    kpm = padding_mask(B, N, pad)
    assignment = [[0, 1, 0], [1, 1, 0], [0, 0, 1]]  # batch elements decide differently
    node = _routed({"name": "fixed_for_test", "assignment": assignment}, full={"op": "dense"}, sparse=XATTN)
    ctx = CallContext(key_padding_mask=kpm)
    out = node(q, k, v, ctx)
    full = node.branches["full"](q, k, v, ctx)
    sparse = node.branches["sparse"](q, k, v, ctx)
    expected = torch.where(torch.tensor(assignment).repeat_interleave(2, 1)[..., None, None] == 0, full, sparse)
    # the sparse branch sees one (batch, KV head) pair per call row; XAttention plans are per head,
    # so running it on the sub-batch selects exactly what it selects on the whole batch
    assert rel_err(out, expected) <= 1e-5


def test_forced_routes_equal_their_branch():
    q, k, v = make_qkv(2, 4, 2, 200, 200, 16)
    ctx = CallContext()
    fa = _routed({"name": "elastic", "head_dim": 16, "forced": "full"}, full={"op": "dense"}, sparse=STREAM)
    sa = _routed({"name": "elastic", "head_dim": 16, "forced": "sparse"}, full={"op": "dense"}, sparse=STREAM)
    assert torch.equal(fa(q, k, v, ctx), ops.dense(q, k, v))
    assert torch.equal(sa(q, k, v, ctx), sa.branches["sparse"](q, k, v, ctx))


def test_router_decision_is_cached_for_decode():
    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    node = _routed({"name": "elastic", "head_dim": 16}, full={"op": "dense"}, sparse=STREAM)
    keys = torch.randn(1, 64, 2, 16)
    cache = {}
    with pytest.warns(UserWarning, match="no trained weights"):  # once per router
        first = node.decide(q, k, CallContext(pre_rope_keys=keys, layer_idx=0, cache=cache))
    later = node.decide(q[:, :, -1:], k, CallContext(pre_rope_keys=torch.randn(1, 1, 2, 16) * 100, layer_idx=0,
                                                      cache=cache, decode=True))
    assert later is first
    with pytest.raises(ValueError, match="needs pre-RoPE keys"):
        node(q, k, v, CallContext(layer_idx=0))


def test_compressed_node_matches_token_plan_reference():
    q, k, v = make_qkv(2, 4, 2, 300, 300, 16, seed=4)
    q, k = q * 2, k * 2
    kpm = padding_mask(2, 300, "right")
    stack = attnzoo.build({"name": "ts", "default": {
        "compress": {"name": "token_coverage", "coverage": 0.3, "window": 32, "min_tokens": 64},
        "inner": {"op": "dense"}}})
    out = stack.default(q, k, v, CallContext(key_padding_mask=kpm))
    plan = stack.default.compress(q, k, {"key_padding_mask": kpm})
    assert plan.density() < 0.9
    ref = ops.reference(q, k, v, plan, key_padding_mask=kpm)
    assert rel_err(out, ref) <= 1e-4
    # compress then XAttention on the compressed tensors runs and keeps dropped rows at zero
    nested = attnzoo.build({"name": "tsx", "default": {
        "compress": {"name": "token_coverage", "coverage": 0.3, "window": 32, "min_tokens": 64}, "inner": XATTN}})
    o2 = nested.default(q, k, v, CallContext(key_padding_mask=kpm))
    dropped = ~plan.keep_mask()  # per query head (token_coverage's default)
    assert torch.equal(o2[dropped], torch.zeros_like(o2[dropped]))


def test_layer_ranges_and_repr_and_roundtrip(tmp_path):
    stack = attnzoo.build({"name": "mix", "default": {"op": "dense"},
                           "layers": {"0-1": STREAM, "3": XATTN, "5 - 7": {"op": "dense"}}})
    assert stack.node_for(0) is stack.node_for(1) is stack.layers[(0, 1)]
    assert stack.node_for(2) is stack.default and stack.node_for(3) is stack.layers[(3, 3)]
    assert "0-1=streaming->block_sparse" in repr(stack)
    path = tmp_path / "s.yaml"
    path.write_text(stack.to_yaml())
    assert attnzoo.build(str(path)).to_config() == stack.to_config()
    stack.check_num_layers(8)
    with pytest.raises(ValueError, match="outside the model's 6 layers"):
        stack.check_num_layers(6)


@pytest.mark.parametrize("name", preset_names())
def test_presets_build_and_roundtrip(name):
    stack = attnzoo.build(f"preset:{name}")
    assert stack.name == name
    assert attnzoo.build(stack.to_yaml()).to_config() == stack.to_config()


def test_all_required_presets_ship():
    assert {"full", "xattention", "streaming", "topk-blocks", "token-sparse", "token-sparse-xattention",
            "router-table-example"} <= set(preset_names())


BAD = [
    ({"default": {"op": "dense"}, "layerz": {}}, r"^layerz: unknown stack key \(did you mean 'layers'\?\)"),
    ({"name": "x"}, r"^default: missing"),
    ({"default": "dense"}, r"^default: a node must be a mapping"),
    ({"default": {"op": "dens"}}, r"^default\.op\.name: unknown op 'dens' \(did you mean 'dense'\?\)"),
    ({"default": {"op": "dense", "selectr": {"name": "streaming"}}}, r"^default\.selectr: unknown node key"),
    ({"default": {"selector": "streaming"}}, r"^default: keys \['selector'\] do not form a node"),
    ({"default": {"op": "dense"}, "layers": {"15-28": {"compress": {"name": "token_coverage"},
                                                        "inner": {"selector": {"name": "xattention", "thresold": 0.9},
                                                                  "op": "block_sparse"}}}},
     r"^layers\.15-28\.inner\.selector\.thresold: unknown key .*did you mean 'threshold'"),
    ({"default": {"selector": {"name": "xattention"}, "op": "dense"}},
     r"^default\.op: op 'dense' cannot run 'block' plans from selector 'xattention'"),
    ({"default": {"op": "block_sparse"}}, r"^default\.op: op 'block_sparse' cannot run 'dense' plans"),
    ({"default": {"compress": {"name": "streaming"}, "inner": {"op": "dense"}}},
     r"^default\.compress: selector 'streaming' does not choose tokens"),
    ({"default": {"router": {"name": "table", "default": "sparse"}, "branches": {"full": {"op": "dense"}}}},
     r"^default\.router: table names branch 'sparse'"),
    ({"default": {"router": {"name": "elastic", "full": "fa"}, "branches": {"full": {"op": "dense"},
                                                                          "sparse": STREAM}}},
     r"^default\.router\.full: branch 'fa'"),
    ({"default": {"router": {"name": "table", "default": "full"}, "branches": {}}},
     r"^default\.branches: expected a non-empty mapping"),
    ({"default": {"router": {"name": "table", "default": "full"}, "branches": {"full": {"op": "dense"},
                                                                             "sparse": "nope"}}},
     r"^default\.branches\.sparse: a node must be a mapping"),
    ({"default": {"op": "dense"}, "layers": {"0-3": {"op": "dense"}, "3-5": {"op": "dense"}}},
     r"^layers\.3-5: overlaps layer range 0-3"),
    ({"default": {"op": "dense"}, "layers": {"5-2": {"op": "dense"}}}, r"^layers\.5-2: layer range '5-2' is empty"),
    ({"default": {"op": "dense"}, "layers": {"a-b": {"op": "dense"}}}, r"^layers\.a-b: layer key 'a-b' must"),
    ({"default": {"op": "dense"}, "layers": {"-1": {"op": "dense"}}}, r"^layers\.-1: layer key '-1' must"),
    ({"default": {"op": "dense"}, "layers": {"first:0": {"op": "dense"}}}, r"^layers\.first:0: first:N needs"),
    ({"default": {"op": "dense"}, "layers": {"from:1.5": {"op": "dense"}}}, r"^layers\.from:1\.5: .*strictly between"),
    ({"default": {"op": "dense"}, "fitted_for": {"layers": 2}}, r"^fitted_for: missing required key"),
    ({"default": {"op": "dense"}, "fitted_for": {"layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 8,
                                                 "what": 1}}, r"^fitted_for: unknown key"),
    ({"default": {"selector": {"name": "streaming", "sink": "big"}, "op": "block_sparse"}},
     r"^default\.selector\.sink: expected an integer"),
    ({"default": {"compress": {"name": "token_coverage"}, "inner": {"router": {"name": "table", "default": "a"},
                                                                  "branches": {"a": {"op": "dense"}}}}},
     r"^default\.inner: routers inside a compressed node are not supported"),
]


@pytest.mark.parametrize("cfg,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_build_errors_name_the_path(cfg, match):
    with pytest.raises(ConfigError, match=match):
        attnzoo.build(cfg)


def test_table_router_runtime_checks():
    q, k, v = make_qkv(1, 4, 2, 32, 32, 8)
    node = _routed({"name": "table", "heads": {0: ["full", "sparse", "sparse"]}}, full={"op": "dense"},
                   sparse=STREAM)
    assert isinstance(node, Routed)
    with pytest.raises(ValueError, match="lists 3 heads, the layer has 2 KV heads"):
        node(q, k, v, CallContext(layer_idx=0))
    with pytest.raises(ValueError, match="not in the table and no default"):
        node(q, k, v, CallContext(layer_idx=1))


def test_elastic_router_save_load_roundtrip(tmp_path):
    r = ElasticRouter(head_dim=16)
    keys = torch.randn(2, 50, 3, 16)
    z = r.logits(keys, 4)
    path = r.save(tmp_path / "router.pt")
    again = ElasticRouter(weights=str(path), head_dim=16)
    assert torch.equal(again.logits(keys, 4), z)
    n_params = sum(p.numel() for p in again.layer(4).parameters())
    assert n_params == 2 * (16 * 64 + 64 + 64 * 16 + 16) + 16 * 2 + 2
    assert sum(p.numel() for p in ElasticRouter(head_dim=128).layer(0).parameters()) == pytest.approx(0.26e6, rel=0.02)
    with pytest.raises(ValueError, match="head_dim=16"):
        ElasticRouter(weights=str(path), head_dim=32)
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an attnzoo elastic router file"):
        ElasticRouter(weights=str(tmp_path / "bad.pt"), head_dim=16)


def test_elastic_pooling_uses_first_and_last_real_tokens():
    from attnzoo.routers.elastic import pool_keys

    keys = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1).expand(2, 10, 1, 1).clone()
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, :4] = False  # left padding: real tokens 4..9
    pooled = pool_keys(keys, 2, kpm)
    assert pooled[0].item() == pytest.approx((0 + 1 + 8 + 9) / 4)
    assert pooled[1].item() == pytest.approx((4 + 5 + 8 + 9) / 4)


def test_mixed_table_router_equals_each_heads_branch():
    q, k, v = make_qkv(2, 6, 3, 160, 160, 16, seed=5)
    kpm = padding_mask(2, 160, "right")
    node = _routed({"name": "table", "heads": {7: ["sparse", "full", "sparse"]}}, full={"op": "dense"}, sparse=XATTN)
    ctx = CallContext(key_padding_mask=kpm, layer_idx=7)
    out = node(q, k, v, ctx)
    full = node.branches["full"](q, k, v, ctx)
    sparse = node.branches["sparse"](q, k, v, ctx)
    for h, src in enumerate([sparse, full, sparse]):  # KV head h serves query heads 2h, 2h+1
        assert torch.equal(out[:, 2 * h: 2 * h + 2], src[:, 2 * h: 2 * h + 2]), f"KV head {h}"


def test_dense_below_runs_dense_attention_on_its_device_and_records_density_one():
    import attnzoo
    from attnzoo import ops
    from attnzoo.stack import CallContext, DensityMeter

    q, k, v = torch.randn(1, 2, 200, 16), torch.randn(1, 1, 200, 16), torch.randn(1, 1, 200, 16)
    sparse = {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"}
    for below, expect_dense in (({"cpu": 300}, True), ({"cuda": 300}, False), (150, False), (300, True)):
        for node in ({**sparse, "dense_below": below},
                     {"router": {"name": "table", "default": "s"}, "branches": {"s": sparse}, "dense_below": below},
                     {"compress": {"name": "token_coverage", "window": 16, "min_tokens": 32}, "inner": sparse,
                      "dense_below": below}):
            meter = DensityMeter()
            out = attnzoo.build({"default": node})(0, q, k, v, CallContext(layer_idx=0, meter=meter))
            is_dense = (out - ops.dense(q, k, v)).abs().max() < 1e-5
            assert bool(is_dense) == expect_dense, (below, list(node))
            assert (meter.mean() == 1.0) == expect_dense


def _aten_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize("node", [
    XATTN,
    {"router": {"name": "table", "heads": {0: ["s", "full"]}}, "branches": {"s": XATTN, "full": {"op": "dense"}}},
    {"compress": {"name": "token_coverage", "window": 16, "min_tokens": 32}, "inner": XATTN},
], ids=["branch", "routed", "compressed"])
def test_density_meter_adds_no_work_to_the_call_and_reads_the_eager_density(node):
    """A metered prefill is timed as is (attnzoo compare), so recording must cost no tensor op:
    the densities are computed when the meter is read, and equal what the plans say."""
    from attnzoo.stack import CallContext, DensityMeter, density_of

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 160, 16), torch.randn(2, 2, 160, 16), torch.randn(2, 2, 160, 16)
    stack = attnzoo.build({"default": node})
    meter = DensityMeter()
    stack(0, q, k, v, CallContext(layer_idx=0))  # first call fills per-shape caches
    plain = _aten_ops(lambda: stack(0, q, k, v, CallContext(layer_idx=0)))
    metered = _aten_ops(lambda: stack(0, q, k, v, CallContext(layer_idx=0, meter=meter)))
    assert metered == plain, f"metering ran {metered - plain} extra ops inside the call"
    got = meter.mean()
    sel = attnzoo.registry.create("selector", XATTN["selector"])
    if "router" in node:  # KV head 0 sparse, head 1 dense: (d0 + 1) / 2 over both batch rows
        d = sel(q, k, CallContext(layer_idx=0)).density(reduce=False).view(2, 2, 2).mean(-1)
        want = float((d[:, 0].mean() + 1.0) / 2)
    elif "compress" in node:  # the kept tokens' density times the inner plan's on them
        from attnzoo.ops import token_sparse

        comp = stack.default
        tplan = comp.compress(q, k, CallContext(layer_idx=0))
        qc, kc, _ = token_sparse.compress(q, k, v, tplan)
        want = float(density_of(tplan) * density_of(comp.inner.selector(qc, kc, CallContext(layer_idx=0))))
        assert want < 1.0
    else:
        want = float(density_of(sel(q, k, CallContext(layer_idx=0))))
    assert got == pytest.approx(want, rel=1e-6)
    meter.reset()
    assert meter.layers == {}


def test_a_decode_part_runs_for_generated_tokens_only():
    """``decode:`` on a node: prefill calls run the node, decode calls (one query against the cache)
    the decode part; the config round-trips and misuse is refused by path."""
    from attnzoo.stack import Phased

    spec = {"name": "d", "default": {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16},
                                     "op": "block_sparse",
                                     "decode": {"selector": {"name": "quest", "page_size": 16, "budget": 32},
                                                "op": "block_sparse"}}}
    stack = build(spec)
    node = stack.default
    assert isinstance(node, Phased) and build(stack.to_config()).to_config() == stack.to_config()
    q, k, v = make_qkv(2, 4, 2, 200, 200, 16, seed=3)
    prefill = stack(0, q, k, v, CallContext(layer_idx=0))
    assert torch.equal(prefill, node.prefill(q, k, v, CallContext(layer_idx=0)))
    q1 = q[:, :, -1:]
    step = stack(0, q1, k, v, CallContext(layer_idx=0, decode=True))
    assert torch.equal(step, node.decode(q1, k, v, CallContext(layer_idx=0, decode=True)))
    assert not torch.allclose(step, node.prefill(q1, k, v, CallContext(layer_idx=0, decode=True)))
    dense_decode = build({"default": {**spec["default"], "decode": {"op": "dense"}}})
    assert torch.allclose(dense_decode(0, q1, k, v, CallContext(layer_idx=0, decode=True)), ops.dense(q1, k, v),
                          atol=1e-6)
    with pytest.raises(ConfigError, match=r"default.decode.decode: a decode part has no decode part"):
        build({"default": {"op": "dense", "decode": {"op": "dense", "decode": {"op": "dense"}}}})
    with pytest.raises(ConfigError, match=r"default.decode.selector.name: unknown selector 'qest' \(did you mean"):
        build({"default": {"op": "dense", "decode": {"selector": {"name": "qest"}, "op": "block_sparse"}}})
