"""Every shipped preset on every common decoder architecture (small random-weight models built
from transformers' own configs): made to fit where it has model-specific parts (``attnzoo.fitting``
for calibrated presets, a router filed for the model for ``weights: auto``), then

- each layer's output equals the stack's layer-level reference: fp32 softmax attention over exactly
  the keys the layer's node keeps (``eval.recall.keep_rows`` reads its plans);
- a left-padded batch prefills and ``generate()``s what each prompt does alone;

or a named refusal where a method cannot apply (a per-KV-head table written for 3 KV heads,
attention-logit soft-capping).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.config import preset_names
from attnzoo.model_shape import ModelShape
from attnzoo.stack import run

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt_neox")
N_LAYERS, VOCAB = 4, 128
LENGTHS = (1300, 1190)  # past streaming's 128 + 1024 tokens; not multiples of 64


def tiny_model(arch: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0)
    cfg_cls, model_cls, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"head_dim": 16}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16, "sliding_window": None}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
        # sliding-window layers alternate with global ones; no soft-capping in Gemma 3
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   {"head_dim": 16, "sliding_window": 256, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"] * (N_LAYERS // 2)}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
        # no GQA: every query head has its own KV head; fused per-head qkv
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    }[arch]
    kw = {**common, **extra, **overrides}
    kw = {k: v for k, v in kw.items() if not (k == "num_key_value_heads" and v is None)}
    torch.manual_seed(0)
    model = getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw)).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.name_or_path = f"tiny-{arch}"
    return model


def _prompts(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def fitted(model, preset: str, tmp_path, monkeypatch):
    """What ``preset`` becomes on ``model``: the shipped stack, or one fitted to the model."""
    from attnzoo import fitting
    from attnzoo.routers.elastic import ElasticRouter
    from attnzoo.training.common import layer_nodes
    from attnzoo.training.elastic import file_router, router_meta

    if preset == "xattention-calibrated":
        cal = fitting.fit_xattention(model, [p[None, :1024] for p in _prompts(5)], progress=False,
                                     max_threshold=0.96)
        return fitting.xattention_stack(cal, fit=fitting.fitted_for(model, preset), dense_tail=64,
                                        max_threshold=0.96)
    if preset == "token-sparse-calibrated":
        drift = fitting.fit_token_sparse(model, _prompts(5)[0][None])
        return fitting.token_sparse_stack(drift, fit=fitting.fitted_for(model, preset))
    if preset.startswith("elastic"):
        # what attnzoo train elastic files for this model: a router with its model and sparse branch
        monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path))
        spec = attnzoo.build(f"preset:{preset}").to_config()["default"]
        sparse = {"name": "b", "default": spec["branches"]["sparse"]}
        router = ElasticRouter(head_dim=ModelShape.of(model).head_dim, seed=1)
        for i in range(N_LAYERS):
            router.layer(i)
        router.save(tmp_path / "router.pt", meta=router_meta(model, layer_nodes(sparse, model)))
        file_router(tmp_path / "router.pt")
    return f"preset:{preset}"


class LayerReference:
    """A probe: each layer's output against fp32 attention over the keys its node keeps."""

    def __init__(self):
        self.worst, self.layers = 0.0, 0

    def __call__(self, layer, node, q, k, v, ctx):
        from dataclasses import replace

        from attnzoo.eval.recall import keep_rows

        if ctx.decode or ctx.key_padding_mask is not None:
            return
        out = run(node, q, k, v, replace(ctx, meter=None)).float()
        n = q.shape[2]
        rows = torch.arange(n).expand(q.shape[0], q.shape[1], n)
        keep = keep_rows(node, q, k, ctx, rows)  # [B, Hq, N, N]: a test may build it
        g = q.shape[1] // k.shape[1]
        s = q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2) * (ctx.scale or q.shape[-1] ** -0.5)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        ref = p @ v.float().repeat_interleave(g, 1)
        self.worst = max(self.worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
        self.layers += 1


def _left_padded(prompts):
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, n - len(p):], mask[b, n - len(p):] = p, 1
    return ids, mask


FITS_ANY = [p for p in preset_names() if p != "router-table-example"]


@torch.no_grad()
@pytest.mark.slow
@pytest.mark.parametrize("preset", FITS_ANY)
@pytest.mark.parametrize("arch", ARCHS)
def test_preset_on_architecture(arch, preset, tmp_path, monkeypatch):
    model = tiny_model(arch)
    stack = attnzoo.build(fitted(model, preset, tmp_path, monkeypatch))
    prompts = _prompts()
    probe = LayerReference()
    with attnzoo.patch(model, stack, probe=probe):
        alone_logits = model(input_ids=prompts[1][None]).logits[0]
    global_layers = sum(t != "sliding_attention" for t in getattr(model.config, "layer_types", None)
                        or ["full_attention"] * N_LAYERS)
    assert probe.layers == global_layers, "every global layer ran the stack"
    assert probe.worst <= 1e-4, f"layer output vs its fp32 reference: {probe.worst:.2e}"
    ids, mask = _left_padded(prompts)
    new = 3
    with attnzoo.patch(model, stack):
        padded_logits = model(input_ids=ids, attention_mask=mask).logits[1, -LENGTHS[1]:]
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        alone = [model.generate(input_ids=p[None], max_new_tokens=new, do_sample=False) for p in prompts]
    assert (padded_logits - alone_logits).abs().max() <= 1e-4
    for b, a in enumerate(alone):
        assert batched[b, -new:].tolist() == a[0, -new:].tolist(), f"prompt {b}"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_table_for_another_model_is_refused_by_name(arch):
    with pytest.raises(ValueError, match="per-KV-head routing table.*Write that part"):
        attnzoo.build("preset:router-table-example").for_model(tiny_model(arch))


@pytest.mark.parametrize("preset", ["xattention-calibrated", "token-sparse-calibrated"])
def test_a_calibrated_preset_on_another_model_names_the_command(preset):
    with pytest.raises(ValueError, match=f"attnzoo calibrate --preset {preset}"):
        attnzoo.build(f"preset:{preset}").for_model(tiny_model("qwen2"))


def test_elastic_without_a_router_for_the_model_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"no router trained for tiny-llama .*attnzoo train elastic --model MODEL "
                                         r"--stack xattention"):
        with attnzoo.patch(tiny_model("llama"), "preset:elastic-fa-xa"):
            pass


@torch.no_grad()
def test_soft_capping_is_refused_not_ignored():
    model = tiny_model("gemma2")  # attn_logit_softcapping 50 by default
    with pytest.raises(ValueError, match="softcap=50.0.*soft-capping"):
        with attnzoo.patch(model, "preset:xattention"):
            model(input_ids=torch.randint(1, VOCAB, (1, 40)))
    # without it (what transformers' SDPA path computes anyway) Gemma 2 runs
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    with attnzoo.patch(model, "preset:xattention"):
        model(input_ids=torch.randint(1, VOCAB, (1, 40)))


@torch.no_grad()
def test_sliding_window_layers_keep_the_models_own_attention():
    """Mistral with a window shorter than the prompt: every layer is a sliding one, so the stack
    leaves them all to the model's windowed attention — the same logits as the model alone,
    not a sparse stack run over keys the window hides."""
    model = tiny_model("mistral", sliding_window=128)
    ids = torch.randint(1, VOCAB, (1, 300))
    plain = model(input_ids=ids).logits
    with attnzoo.patch(model, "preset:streaming"):
        got = model(input_ids=ids).logits
    assert (got - plain).abs().max() <= 1e-5
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = None  # the same prompt without a window differs: the check can fail
    for layer in model.model.layers:
        layer.self_attn.config.sliding_window = None
    assert (model(input_ids=ids).logits - plain).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_routers_read_each_architectures_keys_before_rope(arch):
    """RoPE rotates pairs of dims: at position 0 it is the identity and everywhere it keeps each
    key's norm, so the hooked pre-RoPE keys must match the attention call's keys there (Gemma 3
    normalises keys on [B, H, N, D], Qwen 3 on [B, N, H, D]; Phi-3 and GPT-NeoX fuse q, k, v)."""
    from attnzoo.integrations.hf import capture_qk, pre_rope_key_hooks

    model = tiny_model(arch)
    ids = torch.randint(1, VOCAB, (2, 50))
    with pre_rope_key_hooks(model) as keys:
        post = capture_qk(model, input_ids=ids)
    for layer, (_, k) in post.items():
        pre = keys[layer].transpose(1, 2)  # [B, Hkv, N, D] like k
        assert pre.shape == k.shape
        assert torch.allclose(pre[:, :, 0], k[:, :, 0], atol=1e-5)
        assert torch.allclose(pre.norm(dim=-1), k.norm(dim=-1), atol=1e-4)


def test_a_router_trained_with_a_mostly_dense_sparse_stack_is_filed_under_its_sparse_branch():
    """On a 4-layer model the xattention preset is half dense (first:2): the router's record must
    still name the XAttention branch, or weights: auto would never find it for elastic-fa-xa."""
    from attnzoo.training.common import layer_nodes
    from attnzoo.training.elastic import router_meta

    model = tiny_model("llama")
    assert router_meta(model, layer_nodes("preset:xattention", model))["sparse"] == "xattention->block_sparse"
