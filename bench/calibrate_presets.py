"""Calibrate the shipped presets for the embedded SmolLM2 and write them into attnzoo/presets.

    python bench/calibrate_presets.py --dense-below 24576 --token-sparse-dense-below 65536 \\
        --max-threshold 0.96                                                      # the shipped presets
    python bench/calibrate_presets.py --model FILE.gguf --device cuda --context 32768 \\
        --lengths 8192 16384 32768 --target-recall 0.95 0.9 0.8 0.7 --max-density 0.3 \\
        --presets-dir OUT/presets                                                 # GPU, YaRN-extended

Calibration prompts are NIAH prompts with seeds and haystack offsets disjoint from the
evaluation suite's (``attnzoo compare`` uses seed 0, offset 0): thresholds come from seed 7,
the held-out density check from seed 8, both at haystack offset 40 000. Writes:
- ``calibration/smollm2-xattention-thresholds.yaml`` (per-layer, per-head tau, and how it was made),
- ``calibration/smollm2-drift-layers.yaml`` (Token Sparse's layer choice),
- presets ``xattention-calibrated`` and ``token-sparse-calibrated`` built from them.

``--target-recall`` with several values and ``--max-density D``: thresholds for every recall come
from one pass over the calibration prompts; each candidate then prefills the held-out prompts
(sparse at every length) and the highest recall whose mean density is at most D is shipped. The
authors' own search lowers one head's tau at a time while accuracy holds; with a 135M model whose
full attention answers a third of these prompts, accuracy on a handful of calibration prompts is
too noisy to steer by, so a density budget decides and accuracy is measured afterwards, on the
evaluation suite (``attnzoo compare``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo.calibration import (
    calibrate_threshold_sweep,
    choose_sparse_layers,
    save_calibration,
    xattention_layer_configs,
)
from attnzoo.config import dump_config
from attnzoo.eval.compare import resolve_device, resolve_dtype
from attnzoo.eval.niah import make_prompt, suite
from attnzoo.models import extend_context, load_model
from attnzoo.stack import DensityMeter

PRESETS = Path(__file__).resolve().parents[1] / "attnzoo" / "presets"
CAL_SEED, HELD_OUT_SEED, CAL_OFFSET = 7, 8, 40_000  # evaluation: seed 0, offset 0


def xattention_preset(taus: dict, dense_layers: tuple[int, int], dense_below: int | None, about: str,
                      dense_tail: int = 0, max_threshold: float | None = None) -> dict:
    lo, hi = dense_layers
    per_layer = xattention_layer_configs(taus, max_threshold,
                                         **({"dense_tail": dense_tail} if dense_tail else {}))
    node = {"op": "block_sparse"}
    if dense_below:
        node["dense_below"] = {"cuda": dense_below}
    return {"name": "xattention-calibrated",
            "description": f"XAttention with per-layer, per-head thresholds calibrated on SmolLM2 to attention "
                           f"recall {taus['target_recall']} ({taus.get('aggregate', 'max')} over texts; {about}; "
                           f"bench/calibrate_presets.py); layers {lo}-{hi} "
                           f"dense." + (f" Every tau capped at {max_threshold}." if max_threshold else "")
                           + (f" The last {dense_tail} tokens (the question) keep every block."
                              if dense_tail else "")
                           + (f" On CUDA below {dense_below} keys it runs dense attention." if dense_below else ""),
            "default": {"op": "dense"},
            "layers": {f"{lo}-{hi}": {"op": "dense"},
                       **{str(i): {"selector": per_layer[i], **node} for i in sorted(per_layer) if i > hi}}}


@torch.no_grad()
def held_out_density(model, spec: dict, prompts) -> float:
    """Mean attention density of ``spec`` over ``prompts`` (one prefill each)."""
    stack, meter, got = attnzoo.build(spec), DensityMeter(), []
    for p in prompts:
        meter.reset()
        with attnzoo.patch(model, stack, meter=meter):
            model(p.input_ids.to(model.device), use_cache=False, logits_to_keep=1)
        got.append(meter.mean())
    return sum(got) / len(got)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="'embedded', a .gguf file or a local HF model folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--context", type=int, help="extend the model with YaRN to this many tokens first")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096], help="calibration prompt lengths")
    ap.add_argument("--target-recall", type=float, nargs="+", default=[0.9],
                    help="one recall, or candidates for --max-density to choose among")
    ap.add_argument("--max-density", type=float, help="ship the highest recall whose held-out density is at "
                    "most this (needs no more than one candidate otherwise)")
    ap.add_argument("--aggregate", default="max", choices=["max", "median", "mean"],
                    help="how a head's per-text taus combine (max: the authors')")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--dense-layers", default="0-1")
    ap.add_argument("--dense-below", type=int, help="write dense_below: {cuda: N} into the XAttention preset")
    ap.add_argument("--dense-tail", type=int, default=64, help="XAttention's dense_tail in the preset (tokens; "
                    "0: none); the held-out density check runs without it")
    ap.add_argument("--max-threshold", type=float, help="cap every head's tau in the preset (0.96 shipped): "
                    "heads calibrated to tau ~ 1 keep nearly every block")
    ap.add_argument("--token-sparse-dense-below", type=int, help="the same for the Token Sparse preset")
    ap.add_argument("--presets-dir", type=Path, default=PRESETS, help="where the presets and calibration/ go")
    args = ap.parse_args(argv)
    if args.max_threshold is not None and not 0 < args.max_threshold <= 1:
        ap.error(f"--max-threshold must be in (0, 1], got {args.max_threshold}")
    if len(args.target_recall) > 1 and args.max_density is None:
        ap.error("several --target-recall values need --max-density to choose among them")
    torch.set_grad_enabled(False)
    device = resolve_device(args.device)
    model, tok = load_model(args.model, resolve_dtype(None, device), device)
    factor = extend_context(model, args.context) if args.context else 1
    yarn = f"YaRN x{factor}, " if factor > 1 else ""
    about = f"{yarn}prompts of {'/'.join(map(str, args.lengths))} tokens"
    t0 = time.time()
    prompts = suite(tok, lengths=tuple(args.lengths), depths=(0.2, 0.6), seed=CAL_SEED, offset=CAL_OFFSET)
    sweep = calibrate_threshold_sweep(model, [p.input_ids.to(device) for p in prompts], args.target_recall,
                                      stride=args.stride, block_size=args.block_size, progress=True,
                                      aggregate=args.aggregate)
    dense_layers = tuple(int(x) for x in args.dense_layers.split("-"))
    chosen = sweep[0]
    if args.max_density is not None:
        held = suite(tok, lengths=tuple(args.lengths), depths=(0.4, 0.8), tasks=("single", "multikey"),
                     seed=HELD_OUT_SEED, offset=CAL_OFFSET)
        for cand in sweep:
            cand["held_out_density"] = round(held_out_density(
                model, xattention_preset(cand, dense_layers, None, about, max_threshold=args.max_threshold), held), 4)
            print(f"recall {cand['target_recall']}: held-out density {cand['held_out_density']} "
                  f"over {len(held)} prompts", flush=True)
        fits = [c for c in sweep if c["held_out_density"] <= args.max_density]
        chosen = (max(fits, key=lambda c: c["target_recall"]) if fits
                  else min(sweep, key=lambda c: c["held_out_density"]))
        if not fits:
            print(f"no recall fits density {args.max_density}; shipping the sparsest", flush=True)
        chosen = {**chosen, "max_density": args.max_density,
                  "candidates": {c["target_recall"]: c["held_out_density"] for c in sweep}}
    chosen["calibrated_on"] = about
    if args.max_threshold is not None:
        chosen["max_threshold"] = args.max_threshold  # the preset's cap; the taus here stay uncapped
    drift = choose_sparse_layers(model, make_prompt(tok, "single", max(args.lengths), 0.5, CAL_SEED,
                                                    CAL_OFFSET).input_ids.to(device))
    drift["calibrated_on"] = f"{yarn}one {max(args.lengths)}-token prompt"
    out = args.presets_dir
    save_calibration(chosen, out / "calibration" / "smollm2-xattention-thresholds.yaml")
    save_calibration(drift, out / "calibration" / "smollm2-drift-layers.yaml")
    xa = xattention_preset(chosen, dense_layers, args.dense_below, about, args.dense_tail, args.max_threshold)
    (out / "xattention-calibrated.yaml").write_text(dump_config(xa))
    sparse, ts_below = drift["sparse_layers"], args.token_sparse_dense_below
    ts = {"name": "token-sparse-calibrated",
          "description": f"Token Sparse Attention in the lower-drift half of SmolLM2's layers (representation "
                         f"drift, {drift['calibrated_on']}; bench/calibrate_presets.py)."
                         + (f" On CUDA below {ts_below} keys it runs dense attention." if ts_below else ""),
          "default": {"op": "dense"},
          "layers": {str(i): {"compress": {"name": "token_coverage", "coverage": 0.005, "window": 128,
                                           "min_tokens": 1024}, "inner": {"op": "dense"},
                              **({"dense_below": {"cuda": ts_below}} if ts_below else {})} for i in sparse}}
    (out / "token-sparse-calibrated.yaml").write_text(dump_config(ts))
    taus = chosen["thresholds"]
    mean_tau = sum(sum(v) / len(v) for v in taus.values()) / len(taus)
    print(f"calibrated in {time.time() - t0:.0f} s: recall {chosen['target_recall']}, mean tau {mean_tau:.3f}; "
          f"sparse layers {sparse}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
