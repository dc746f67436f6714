"""Left padding (what batched ``generate()`` builds) gives what each prompt gives alone.

Plans tile blocks from a sequence's first token and ``streaming`` puts its sink there; before the
stack rolled left-padded sequences to start at row 0, the sink and block grid sat on the padding
(max logit difference 0.75-1.1 at 64 real tokens + 8 pads) and generate() diverged.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.stack import CallContext, build

TINY_STACKS = {
    # small enough configs that the prompts below are many blocks long, so the plan matters
    "streaming": {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"},
    "topk-blocks": {"selector": {"name": "topk_blocks", "block_size": 16, "top_k": 3}, "op": "block_sparse"},
    # the shipped preset's shape: a sink and a local window besides the top-k (both placed per sequence)
    "topk-window": {"selector": {"name": "topk_blocks", "block_size": 16, "top_k": 2, "sink": 16, "local": 32},
                    "op": "block_sparse"},
    "xattention": {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.7,
                                "chunk_size": 64}, "op": "block_sparse"},
    # the question's rows keep every block: the tail must follow each sequence's own end
    "xattention-tail": {"selector": {"name": "xattention", "stride": 4, "block_size": 16, "threshold": 0.7,
                                     "chunk_size": 64, "dense_tail": 20}, "op": "block_sparse"},
    "token-sparse": {"compress": {"name": "token_coverage", "coverage": 0.05, "window": 16, "min_tokens": 32},
                     "inner": {"op": "dense"}},
    # token-sparse-xattention's shape: a batch pads the kept tokens to its longest sequence, which
    # the inner XAttention scored (0.012 logit difference in a 4-layer Llama before sequences ran
    # one at a time through a compressed node whose inner node places blocks)
    "token-sparse-xa": {"compress": {"name": "token_coverage", "coverage": 0.05, "window": 16, "min_tokens": 32},
                        "inner": {"selector": {"name": "xattention", "stride": 4, "block_size": 16,
                                               "threshold": 0.7, "chunk_size": 64}, "op": "block_sparse"}},
    "routed": {"router": {"name": "table", "default": "sparse", "heads": {0: ["full", "sparse"]}},
               "branches": {"full": {"op": "dense"},
                            "sparse": {"selector": {"name": "streaming", "sink": 16, "local": 32,
                                                    "block_size": 16}, "op": "block_sparse"}}},
    # elastic-xa-streaming's shape: heads routed between a tailed XAttention branch and streaming
    "routed-xa-tail": {"router": {"name": "table", "default": "sparse", "heads": {0: ["xa", "sparse"]}},
                       "branches": {"xa": {"selector": {"name": "xattention", "stride": 4, "block_size": 16,
                                                        "threshold": 0.7, "chunk_size": 64, "dense_tail": 20},
                                           "op": "block_sparse"},
                                    "sparse": {"selector": {"name": "streaming", "sink": 16, "local": 32,
                                                            "block_size": 16}, "op": "block_sparse"}}},
}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, compare all steps
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_llama()


def _node_call(stack, q, k, v, kpm):
    return build({"name": "t", "default": stack})(0, q, k, v, CallContext(key_padding_mask=kpm, layer_idx=0))


@pytest.mark.parametrize("name", ["streaming", "topk-blocks", "topk-window", "xattention", "xattention-tail",
                                  "token-sparse", "token-sparse-xa", "routed", "routed-xa-tail"])
def test_left_padded_layer_equals_each_sequence_alone(name):
    g = torch.Generator().manual_seed(1)
    N, pads = 190, (0, 9, 40)  # sequence b: pads[b] padding rows, then its real tokens
    q, k, v = (torch.randn(3, h, N, 16, generator=g) for h in (4, 2, 2))
    kpm = torch.arange(N)[None, :] >= torch.tensor(pads)[:, None]
    out = _node_call(TINY_STACKS[name], q, k, v, kpm)
    for b, p in enumerate(pads):
        alone = _node_call(TINY_STACKS[name], q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], None)
        assert (out[b:b + 1, :, p:] - alone).abs().max() <= 1e-5, f"sequence {b} ({p} pads)"
        # the node really is sparse here: dense attention gives something else
        dense = _node_call({"op": "dense"}, q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], None)
        assert (dense - alone).abs().max() > 1e-3


def _left_padded(prompts, pad_id=0):
    N = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), N), pad_id)
    mask = torch.zeros(len(prompts), N, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, N - len(p):] = torch.tensor(p)
        mask[b, N - len(p):] = 1
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("name", ["streaming", "topk-blocks", "topk-window", "xattention", "xattention-tail",
                                  "routed", "routed-xa-tail"])
def test_left_padded_generate_equals_each_prompt_alone(tiny, name):
    g = torch.Generator().manual_seed(2)
    lengths = (150, 123, 97)  # different left padding per row; every prompt spans many 16-blocks
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]
    ids, mask = _left_padded(prompts)
    stack = {"name": name, "default": TINY_STACKS[name]}
    new = 12  # decode steps walk past the streaming window's block edges
    with attnzoo.patch(tiny, stack):
        batched = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        alone = [tiny.generate(input_ids=torch.tensor([p]), max_new_tokens=new, do_sample=False) for p in prompts]
    for b, a in enumerate(alone):
        assert a.shape[1] == len(prompts[b]) + new
        assert batched[b, -new:].tolist() == a[0, -new:].tolist(), f"prompt {b}"
    # and the sparse stack changes the model's output on these prompts (the test can fail)
    with attnzoo.patch(tiny, "preset:full"):
        dense = tiny(input_ids=torch.tensor([prompts[0]])).logits
    with attnzoo.patch(tiny, stack):
        sparse = tiny(input_ids=torch.tensor([prompts[0]])).logits
    assert (dense - sparse).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["qhead", "kvhead"])
def test_left_padded_generate_with_quest_decode_equals_each_prompt_alone(tiny, per_kv_head):
    """A decode part (Quest's pages, bounds kept in the cache, the last page updated per step): a
    left-padded batch generates what each prompt does alone, and the pages change the tokens."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (230, 181, 140)]
    ids, mask = _left_padded(prompts)
    quest = {"name": "quest-decode", "default": {"op": "dense", "decode": {
        "selector": {"name": "quest", "page_size": 16, "budget": 64, "per_kv_head": per_kv_head},
        "op": "block_sparse"}}}
    new = 20  # crosses page edges: the bounds' last page restarts
    with attnzoo.patch(tiny, quest):
        batched = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        alone = [tiny.generate(input_ids=torch.tensor([p]), max_new_tokens=new, do_sample=False) for p in prompts]
    for b, a in enumerate(alone):
        assert batched[b, -new:].tolist() == a[0, -new:].tolist(), f"prompt {b}"
    with attnzoo.patch(tiny, "preset:full"):
        dense = [tiny.generate(input_ids=torch.tensor([p]), max_new_tokens=new, do_sample=False) for p in prompts]
    assert any(d[0, -new:].tolist() != a[0, -new:].tolist() for d, a in zip(dense, alone, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("preset", ["streaming", "topk-blocks", "xattention"])
def test_left_padded_generate_with_the_shipped_presets(preset):
    """The presets themselves (their CUDA crossovers do not apply on the CPU), on prompts long enough
    for their windows and budgets to matter (streaming keeps 128 + 1024 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (1500, 1371)]
    ids, mask = _left_padded(prompts)
    new = 6
    with attnzoo.patch(model, f"preset:{preset}"):
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        alone = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=new, do_sample=False) for p in prompts]
        # the logits too: random weights keep greedy tokens stable under small changes, logits are not
        padded_logits = model(input_ids=ids, attention_mask=mask).logits[1, -len(prompts[1]):]
        alone_logits = model(input_ids=torch.tensor([prompts[1]])).logits[0]
    for b, a in enumerate(alone):
        assert batched[b, -new:].tolist() == a[0, -new:].tolist(), f"prompt {b}"
    assert (padded_logits - alone_logits).abs().max() <= 1e-4
