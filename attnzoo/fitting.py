"""Fit a preset to a model: its model-specific parts made on the model itself.

``attnzoo calibrate`` is this module on the command line; ``bench/calibrate_presets.py`` calls it
to write the shipped SmolLM2 presets. Two presets have parts that only a model can set:

- ``xattention-calibrated``: per-layer, per-head XAttention thresholds (``calibrate_threshold_sweep``:
  each head keeps ``target_recall`` of its true attention mass on the calibration prompts);
- ``token-sparse-calibrated``: the layers Token Sparse compresses (the calmer half by
  representation drift, ``choose_sparse_layers``).

The stack written says what it was fitted to (``fitted_for``: the model's shape and name, the
parts, the command that refits them), so it refuses another model instead of running wrongly.
Calibration prompts are NIAH prompts with seeds and haystack offsets disjoint from every
evaluation's (``attnzoo compare``: seed 0, offset 0; copy prompts their own seeds).
"""

from __future__ import annotations

import torch

from .allocation import budget_thresholds, threshold_curves
from .calibration import calibrate_threshold_sweep, choose_sparse_layers, xattention_layer_configs
from .model_shape import ModelShape
from .stack import DensityMeter, build

__all__ = ["FITTABLE", "CAL_SEED", "HELD_OUT_SEED", "CAL_OFFSET", "fitted_for", "xattention_stack",
           "fit_xattention", "token_sparse_stack", "fit_token_sparse", "held_out_density", "TOKEN_COVERAGES",
           "with_coverage", "fit_token_coverage"]

CAL_SEED, HELD_OUT_SEED, CAL_OFFSET = 7, 8, 40_000
FITTABLE = {
    "xattention-calibrated": "per-layer, per-head XAttention thresholds",
    "token-sparse-calibrated": "Token Sparse layer choice (representation drift)",
}
TOKEN_SPARSE = {"name": "token_coverage", "coverage": 0.005, "window": 128, "min_tokens": 1024}


def fitted_for(model, preset: str, options: str = "") -> dict:
    """The ``fitted_for`` record of a stack made on ``model`` from ``preset``; ``options``: the
    calibrate options it was made with (``--density-budget 0.38``), so that the refit command a
    refusal prints makes the same kind of stack for another model."""
    how = f" {options}" if options else ""
    return {**ModelShape.of(model).to_config(), "parts": FITTABLE[preset],
            "refit": f"attnzoo calibrate --preset {preset} --model MODEL{how} --out my-stack.yaml"}


def xattention_stack(calibration: dict, *, fit: dict | None = None, dense_layers: str = "first:2",
                     dense_tail: int = 0, max_threshold: float | None = None, dense_below: int | None = None,
                     name: str = "xattention-calibrated", description: str = "") -> dict:
    """A stack config from a threshold calibration: ``dense_layers`` dense, every other calibrated
    layer XAttention with its heads' thresholds (capped at ``max_threshold``)."""
    from .layer_spans import parse_layer_key, resolve_layer_key

    per_layer = xattention_layer_configs(calibration, max_threshold,
                                         **({"dense_tail": dense_tail} if dense_tail else {}))
    key = parse_layer_key(dense_layers, "dense_layers")
    lo, hi = key if isinstance(key, tuple) else resolve_layer_key(key, len(per_layer), "dense_layers")
    node = {"op": "block_sparse", **({"dense_below": {"cuda": dense_below}} if dense_below else {})}
    out = {"name": name, "description": description or _about(calibration, "XAttention thresholds")}
    if fit:
        out["fitted_for"] = fit
    out["default"] = {"op": "dense"}
    out["layers"] = {dense_layers: {"op": "dense"},
                     **{str(i): {"selector": per_layer[i], **node} for i in sorted(per_layer) if not lo <= i <= hi}}
    return out


def token_sparse_stack(drift: dict, *, fit: dict | None = None, dense_below: int | None = None,
                       name: str = "token-sparse-calibrated", description: str = "",
                       coverage: float | None = None) -> dict:
    """A stack config compressing tokens (Token Sparse) in the layers of a drift calibration, at
    coverage tau ``coverage`` (default: the paper's, ``TOKEN_SPARSE``)."""
    compress = dict(TOKEN_SPARSE, **({"coverage": coverage} if coverage is not None else {}))
    node = {"compress": compress, "inner": {"op": "dense"},
            **({"dense_below": {"cuda": dense_below}} if dense_below else {})}
    what = "Token Sparse layers"
    if coverage is not None:
        fitted = drift.get("coverage_fit", {})
        if fitted.get("coverage") != coverage:
            what += f" and coverage tau {coverage}"
        elif fitted.get("met", True):
            what += (f" and coverage tau {coverage} (the largest keeping attention recall {fitted['target_recall']}"
                     f" in its layers on held-out prompts)")
        else:  # a target no tau met must not read as met
            what += (f" and coverage tau {coverage} (the smallest tried: none kept attention recall "
                     f"{fitted['target_recall']} in its layers on held-out prompts; this one kept "
                     f"{fitted['candidates'][coverage]['recall']})")
    out = {"name": name, "description": description or _about(drift, what)}
    if fit:
        out["fitted_for"] = fit
    out["default"] = {"op": "dense"}
    out["layers"] = {str(i): dict(node) for i in drift["sparse_layers"]}
    return out


def _about(calibration: dict, what: str) -> str:
    how = calibration.get("calibrated_on", "")
    recall = f" to attention recall {calibration['target_recall']}" if "target_recall" in calibration else ""
    if "stack_density_budget" in calibration:
        recall = (f" to keep the most attention mass at mean density {calibration['stack_density_budget']} (held-out "
                  f"{calibration['held_out_density']}; calibration recall {calibration['expected']['recall']} in the "
                  f"sparse layers)")
    return f"{what} calibrated{recall} on {how} (attnzoo calibrate)."


@torch.no_grad()
def held_out_density(model, spec: dict, prompts) -> float:
    """Mean attention density of stack ``spec`` over ``prompts`` (input_ids tensors; one prefill
    each, sparse path at every length)."""
    import attnzoo

    from .config import without_dense_below

    stack, meter, got = build(without_dense_below(spec)), DensityMeter(), []
    for ids in prompts:
        meter.reset()
        with attnzoo.patch(model, stack, meter=meter):
            model(ids.to(model.device), use_cache=False, logits_to_keep=1)
        got.append(meter.mean())
    return sum(got) / len(got)


def fit_xattention(model, prompts, *, target_recall=(0.9,), max_density: float | None = None, held_out=(),
                   stride: int = 8, block_size: int = 64, aggregate: str = "max", max_threshold: float | None = None,
                   density_budget: float | None = None, dense_layers: str = "first:2", progress: bool = True) -> dict:
    """Per-head thresholds for ``model`` from calibration ``prompts`` (input_ids tensors).

    With ``density_budget`` (a stack's mean density, dense layers counted 1.0): the thresholds that
    keep the most attention mass at that density (``attnzoo.allocation``), checked on the
    ``held_out`` prompts and re-allocated (at most three times) until their density is within
    the budget. Otherwise per-recall thresholds: several ``target_recall`` values need
    ``max_density``, and the highest recall whose held-out density is at most it is returned (the
    sparsest where none fits). Returns the calibration dict (``thresholds``, how it was made)."""
    if density_budget is not None:
        return _fit_budget(model, prompts, density_budget, held_out, stride=stride, block_size=block_size,
                           dense_layers=dense_layers, max_threshold=max_threshold, progress=progress)
    recalls = tuple(target_recall)
    if len(recalls) > 1 and (max_density is None or not held_out):
        raise ValueError("several target_recall values need max_density and held_out prompts to choose among them")
    sweep = calibrate_threshold_sweep(model, list(prompts), recalls, stride=stride, block_size=block_size,
                                      progress=progress, aggregate=aggregate)
    if max_density is None:
        chosen = sweep[0]
    else:
        for cand in sweep:
            cand["held_out_density"] = round(held_out_density(
                model, xattention_stack(cand, max_threshold=max_threshold), held_out), 4)
            if progress:
                print(f"recall {cand['target_recall']}: held-out density {cand['held_out_density']} over "
                      f"{len(held_out)} prompts", flush=True)
        fits = [c for c in sweep if c["held_out_density"] <= max_density]
        chosen = max(fits, key=lambda c: c["target_recall"]) if fits else min(
            sweep, key=lambda c: c["held_out_density"])
        chosen = {**chosen, "max_density": max_density,
                  "candidates": {c["target_recall"]: c["held_out_density"] for c in sweep}}
    if max_threshold is not None:
        chosen["max_threshold"] = max_threshold  # the stack's cap; the taus here stay uncapped
    return chosen


def _fit_budget(model, prompts, budget: float, held_out, *, stride, block_size, dense_layers, max_threshold,
                progress) -> dict:
    from .integrations.hf import decoder_layers
    from .layer_spans import parse_layer_key, resolve_layer_key

    if not 0 < budget <= 1:
        raise ValueError(f"density_budget must be a density in (0, 1], got {budget}")
    if not held_out:
        raise ValueError("density_budget needs held_out prompts to check the density it reaches")
    n = len(decoder_layers(model))
    key = parse_layer_key(dense_layers, "dense_layers")
    lo, hi = key if isinstance(key, tuple) else resolve_layer_key(key, n, "dense_layers")
    dense = [i for i in range(n) if lo <= i <= hi]
    if budget * n <= len(dense):
        raise ValueError(f"density_budget {budget}: the {len(dense)} dense layers alone use {len(dense) / n:.3f} "
                         f"of the {n} layers' attention")
    curves = threshold_curves(model, list(prompts), stride=stride, block_size=block_size, progress=progress)
    head_budget = (budget * n - len(dense)) / (n - len(dense))  # dense layers count 1.0 in a stack's density
    tries = []
    for _ in range(4):  # the held-out density lands within [0.95, 1.01] x the budget, or the best of four
        cal = budget_thresholds(curves, min(head_budget, 1.0), stride=stride, block_size=block_size,
                                dense_layers=dense)
        got = held_out_density(model, xattention_stack(cal, dense_layers=dense_layers, max_threshold=max_threshold),
                               held_out)
        tries.append((cal, {"head_budget": round(head_budget, 4), "held_out_density": round(got, 4)}))
        if progress:
            print(f"head budget {head_budget:.4f}: held-out density {got:.4f} (stack budget {budget})", flush=True)
        if 0.95 * budget <= got <= 1.01 * budget or (got < budget and head_budget >= 1):
            break
        head_budget *= (budget * n - len(dense)) / max(got * n - len(dense), 1e-6)
    fits = [t for t in tries if t[1]["held_out_density"] <= 1.01 * budget]
    cal, best = (max(fits, key=lambda t: t[1]["held_out_density"]) if fits
                 else min(tries, key=lambda t: t[1]["held_out_density"]))
    return {**cal, "stack_density_budget": budget, "held_out_density": best["held_out_density"],
            "tries": [t[1] for t in tries], **({"max_threshold": max_threshold} if max_threshold is not None else {})}


@torch.no_grad()
def fit_token_sparse(model, prompt: torch.Tensor, quantile: float = 0.5) -> dict:
    """Token Sparse's layers for ``model`` from one long calibration prompt."""
    return choose_sparse_layers(model, prompt.to(model.device), quantile=quantile)


TOKEN_COVERAGES = (0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001)


def with_coverage(spec: dict, coverage: float) -> dict:
    """A copy of a Token Sparse stack config with every compressing node's coverage tau set."""
    def walk(x):
        if isinstance(x, dict):
            out = {k: walk(v) for k, v in x.items()}
            if isinstance(out.get("compress"), dict) and out["compress"].get("name") == "token_coverage":
                out["compress"] = {**out["compress"], "coverage": coverage}
            return out
        return x
    return walk(spec)


@torch.no_grad()
def fit_token_coverage(model, spec: dict, held_out, target_recall: float, *, coverages=TOKEN_COVERAGES,
                       progress: bool = True) -> dict:
    """Token Sparse's coverage tau for ``model``: the largest of ``coverages`` (the most tokens
    dropped) at which stack ``spec`` keeps at least ``target_recall`` of full attention's softmax
    mass -- mean over the heads of the layers it compresses, at sampled query rows of the
    ``held_out`` prompts (``attnzoo.eval.recall``), sparse path at every length. Where none does,
    the smallest (it keeps the most) with ``met`` false, and the stack's description says so. Tried
    from the largest down, stopping at the first that meets the target. Returns ``{"coverage",
    "target_recall", "met", "candidates": {tau: {"recall", "density"}}}``.

    Why a recall target: the paper's tau 0.005 dropped a copy prompt's hidden segment at 8K (copy
    13 % of full's) and 0.0002 kept it (96 %); recall 0.85 against 0.95 (CPU pilot,
    bench/results/2026-12-07-cpu-token-sparse-coverage)."""
    import attnzoo

    from .config import without_dense_below
    from .eval.recall import RecallProbe
    from .integrations.hf import decoder_layers
    from .stack import Compressed

    if isinstance(target_recall, bool) or not 0 < float(target_recall) <= 1:
        raise ValueError(f"target_recall must lie in (0, 1], got {target_recall!r}")
    if not held_out:
        raise ValueError("fit_token_coverage needs held_out prompts to measure recall on")
    taus = sorted({float(c) for c in coverages}, reverse=True)
    if not taus or not all(0 < c < 1 for c in taus):
        raise ValueError(f"coverages must be values in (0, 1), got {coverages!r}")
    n_layers = len(decoder_layers(model))
    candidates, chosen = {}, None
    for tau in taus:
        stack, meter, probe = build(without_dense_below(with_coverage(spec, tau))), DensityMeter(), RecallProbe()
        sparse_layers = [i for i in range(n_layers) if isinstance(stack.node_for(i), Compressed)]
        if not sparse_layers:
            raise ValueError("spec compresses no layer of the model: nothing to fit")
        recall, density = [], []
        for ids in held_out:
            meter.reset()
            probe.reset()
            with attnzoo.patch(model, stack, meter=meter, probe=probe):
                model(ids.to(model.device), use_cache=False, logits_to_keep=1)
            got = probe.layers()
            per_layer = [sum(got[i]["recall"]) / len(got[i]["recall"]) for i in sparse_layers if i in got]
            recall.append(sum(per_layer) / max(1, len(per_layer)))
            density.append(meter.mean())
        candidates[tau] = {"recall": round(sum(recall) / len(recall), 4),
                           "density": round(sum(density) / len(density), 4)}
        if progress:
            print(f"coverage {tau}: recall {candidates[tau]['recall']} in the compressed layers, density "
                  f"{candidates[tau]['density']} over {len(held_out)} prompts", flush=True)
        if candidates[tau]["recall"] >= target_recall:
            chosen = tau
            break
    return {"coverage": chosen if chosen is not None else taus[-1], "target_recall": float(target_recall),
            "met": chosen is not None, "candidates": candidates}
