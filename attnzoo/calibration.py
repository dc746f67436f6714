"""Offline calibration on any Hugging Face causal LM, saved as YAML a stack can load (a tool that
runs models, so it lives beside the stack, not among the selectors' pure ``(q, k, ctx) -> plan``
functions).

- ``calibrate_thresholds``: per-layer, per-head XAttention thresholds from real attention (the
  authors' profile procedure). Per head and calibration text: in every query-block row take the
  fewest *exact* key blocks (true attention mass, sink and diagonal counted as kept) that cover
  ``target_recall`` of the row; the smallest *estimated* score among them, over all rows, sets
  tau = (estimated mass at or above that score) / (total estimated mass). The head's tau is the
  max over texts (and batch elements).
- ``choose_sparse_layers``: Token Sparse Attention's layer choice. Per layer, representation
  drift = mean over tokens of ||h_out - h_in|| / ||h_in||; layers at or below the ``quantile``
  of drift (the calmer half by default) are the sparse ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import dump_config, load_config
from .context import CallContext
from .ops.selection import causal_block_sets
from .plans import last_visible_block
from .plans.geometry import cdiv
from .selectors.xattention import XAttention

__all__ = ["exact_block_mass", "head_thresholds", "layer_block_masses", "calibrate_thresholds",
           "calibrate_threshold_sweep", "choose_sparse_layers", "xattention_layer_configs", "save_calibration",
           "load_calibration"]


@torch.no_grad()
def exact_block_mass(q, k, block_size: int, key_padding_mask=None, chunk: int = 1024):
    """``[B, Hq, Nqb, Nkb]``: true causal attention mass per (query block, key block), summed over
    the block's query rows. Scores are formed ``chunk`` queries at a time (chunk x N, not N x N)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g, b = Hq // Hkv, block_size
    nqb, nkb = cdiv(Nq, b), cdiv(Nk, b)
    chunk = max(b, chunk // b * b)
    kf = k.float()
    out = torch.zeros(B, Hq, nqb, nkb, device=q.device)
    kpos = torch.arange(Nk, device=q.device)
    for r0 in range(0, Nq, chunk):
        r1 = min(Nq, r0 + chunk)
        qc = q[:, :, r0:r1].float().reshape(B, Hkv, g * (r1 - r0), D)
        s = (qc @ kf.transpose(-1, -2)).view(B, Hq, r1 - r0, Nk) / math.sqrt(D)
        allowed = kpos[None, :] <= torch.arange(r0, r1, device=q.device)[:, None] + (Nk - Nq)
        if key_padding_mask is not None:
            allowed = allowed[None, None] & key_padding_mask[:, None, None, :]
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        p = F.pad(p, (0, nkb * b - Nk, 0, (-(r1 - r0)) % b))
        blocks = p.reshape(B, Hq, -1, b, nkb, b).sum((3, 5))
        out[:, :, r0 // b: r0 // b + blocks.shape[2]] += blocks
    return out


def head_thresholds(w, exact, target_recall: float, q_len: int, kv_len: int, block_size: int):
    """Per-head tau ``[B, H]`` from estimated block scores ``w`` and exact block mass ``exact``
    (both ``[B, H, Nqb, Nkb]``), sink and diagonal blocks counted as always kept."""
    last = last_visible_block(q_len, kv_len, block_size, block_size, w.device)
    visible, forced = causal_block_sets(last, w.shape[-1])
    row_total = exact.sum(-1, keepdim=True)
    need = target_recall * row_total - (exact * forced).sum(-1, keepdim=True)
    others = exact.masked_fill(~visible | forced, -1.0)
    vals, order = others.sort(dim=-1, descending=True, stable=True)
    before = vals.clamp(min=0).cumsum(-1) - vals.clamp(min=0)
    needed_sorted = (vals >= 0) & (before < need)
    needed = torch.zeros_like(needed_sorted).scatter(-1, order, needed_sorted)
    big = torch.finfo(w.dtype).max
    w_min = w.masked_fill(~needed, big).flatten(-2).amin(-1)  # [B, H]: smallest needed estimate
    wv = w * visible
    total = wv.flatten(-2).sum(-1).clamp_min(1e-30)
    above = (wv * (w >= w_min[..., None, None])).flatten(-2).sum(-1)
    forced_share = (wv * forced).flatten(-2).sum(-1) / total
    tau = torch.where(w_min < big, above / total, forced_share)
    return tau.clamp(min=1e-3, max=1.0)


AGGREGATES = {"max": lambda t: t.amax(0), "median": lambda t: t.median(0).values, "mean": lambda t: t.mean(0)}


@torch.no_grad()
def layer_block_masses(model, calibration_inputs, *, stride: int, block_size: int, progress: bool = False):
    """Yield ``(layer, w, exact, q_len, kv_len)`` for every calibration input and attention layer:
    XAttention's estimated block scores ``w`` and the true block mass ``exact`` (both ``[B, H, Nqb,
    Nkb]``), from one captured prefill per input (dicts of model inputs or ``input_ids`` tensors)."""
    from .integrations.hf import capture_qk

    scorer = XAttention(threshold=1.0, stride=stride, block_size=block_size,
                        chunk_size=max(block_size, 2048 // block_size * block_size))
    items = list(calibration_inputs)
    if not items:
        raise ValueError("calibration_inputs is empty")
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="calibrating thresholds")
    for inputs in items:
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs}
        kpm = inputs.get("attention_mask")
        kpm = kpm.bool() if kpm is not None else None
        for layer, (q, k) in capture_qk(model, **inputs).items():
            w = torch.cat([w for _, _, w in scorer.block_scores(q, k, CallContext(key_padding_mask=kpm))], 2)
            yield layer, w, exact_block_mass(q, k, block_size, kpm), q.shape[2], k.shape[2]


@torch.no_grad()
def calibrate_thresholds(model, calibration_inputs, *, stride: int = 8, block_size: int = 128,
                         target_recall: float = 0.9, progress: bool = False) -> dict:
    """Per-layer, per-query-head XAttention thresholds for ``model``.

    ``calibration_inputs``: an iterable of dicts of model inputs (``input_ids``, optional
    ``attention_mask``) or of ``input_ids`` tensors. Returns a YAML-ready dict with
    ``thresholds: {layer_idx: [tau per query head]}``.
    """
    return calibrate_threshold_sweep(model, calibration_inputs, (target_recall,), stride=stride,
                                     block_size=block_size, progress=progress)[0]


@torch.no_grad()
def calibrate_threshold_sweep(model, calibration_inputs, target_recalls, *, stride: int = 8,
                              block_size: int = 128, progress: bool = False, aggregate: str = "max") -> list[dict]:
    """``calibrate_thresholds`` for several target recalls at the cost of one: each text's scores
    and exact block masses are computed once and reduced for every recall. Returns one result per
    recall, in the order given (a density budget then picks among them: see
    ``bench/calibrate_presets.py --max-density``). ``aggregate``: how a head's per-text taus
    combine: ``max`` (the authors': every calibration text keeps its recall), ``median`` or
    ``mean`` (one text whose attention is unusually spread does not make the head dense)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATES)}, got {aggregate!r}")
    recalls = tuple(float(r) for r in target_recalls)
    if not recalls:
        raise ValueError("target_recalls is empty")
    for r in recalls:
        if not 0 < r <= 1:
            raise ValueError(f"target_recall must lie in (0, 1], got {r}")
    per_text: list[dict[int, list[torch.Tensor]]] = [{} for _ in recalls]
    for layer, w, exact, q_len, kv_len in layer_block_masses(model, calibration_inputs, stride=stride,
                                                               block_size=block_size, progress=progress):
        for r, found in zip(recalls, per_text, strict=True):
            tau = head_thresholds(w, exact, r, q_len, kv_len, block_size)  # [B, H]
            found.setdefault(layer, []).extend(tau.unbind(0))
    reduce = AGGREGATES[aggregate]
    best = [{layer: reduce(torch.stack(taus)) for layer, taus in found.items()} for found in per_text]
    return [{
        "method": "xattention_thresholds",
        "stride": stride,
        "block_size": block_size,
        "target_recall": r,
        "aggregate": aggregate,
        "thresholds": {int(layer): [round(float(t), 6) for t in tau] for layer, tau in sorted(found.items())},
    } for r, found in zip(recalls, best, strict=True)]


@torch.no_grad()
def choose_sparse_layers(model, inputs, *, quantile: float = 0.5) -> dict:
    """Token Sparse's representation-drift layer choice. ``inputs``: a dict of model inputs or an
    ``input_ids`` tensor (one long prompt). Returns a YAML-ready dict with ``sparse_layers``."""
    from .integrations.hf import decoder_layers

    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    layers = decoder_layers(model)
    drift = [0.0] * len(layers)
    mask = inputs.get("attention_mask")

    def hook(idx):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            d = (h_out - h_in).float().norm(dim=-1) / h_in.float().norm(dim=-1).clamp_min(1e-12)
            drift[idx] = float(d[mask.bool()].mean() if mask is not None else d.mean())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    d = torch.tensor(drift)
    norm = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-12)
    cut = torch.quantile(norm, quantile)
    return {
        "method": "representation_drift",
        "quantile": quantile,
        "drift": [round(float(x), 6) for x in norm],
        "sparse_layers": [i for i, x in enumerate(norm.tolist()) if x <= float(cut) + 1e-12],
    }


def xattention_layer_configs(calibration: dict, max_threshold: float | None = None,
                             **overrides) -> dict[int, dict]:
    """``{layer: {"name": "xattention", "threshold": [tau per head], ...}}`` from a threshold
    calibration, ready for ``attnzoo.create("selector", ...)`` or a stack's per-layer nodes.

    ``max_threshold`` caps every head's tau. A head calibrated to tau ~ 1 keeps nearly every block
    (its recall target is only met by the whole row), and a few such heads set a stack's density:
    on the YaRN-extended SmolLM2 a cap of 0.96 took the mean density from 0.55 to 0.30 at full
    attention's accuracy (H200, 216 NIAH prompts at 8K-32K)."""
    if calibration.get("method") != "xattention_thresholds":
        raise ValueError("expected a calibration made by calibrate_thresholds")
    if max_threshold is not None and (isinstance(max_threshold, bool) or not isinstance(max_threshold, (int, float))
                                      or not 0 < max_threshold <= 1):
        raise ValueError(f"max_threshold must be a number in (0, 1], got {max_threshold!r}")
    cap = 1.0 if max_threshold is None else float(max_threshold)
    base = {"name": "xattention", "stride": calibration["stride"], "block_size": calibration["block_size"]}
    return {int(layer): {**base, "threshold": [min(float(t), cap) for t in taus], **overrides}
            for layer, taus in calibration["thresholds"].items()}


def save_calibration(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(result))
    return path


def load_calibration(path) -> dict:
    data = load_config(str(path))
    if data.get("method") not in ("xattention_thresholds", "representation_drift"):
        raise ValueError(f"{path}: not an attnzoo calibration file (method={data.get('method')!r})")
    return data
