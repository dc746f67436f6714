"""Calibrate the shipped presets for the embedded SmolLM2 and write them into attnzoo/presets.

    python bench/calibrate_presets.py [--target-recall 0.9]

Calibration prompts are NIAH prompts with seeds and haystack offsets disjoint from the
evaluation suite's (``attnzoo compare`` uses seed 0, offset 0). Writes:
- ``attnzoo/presets/calibration/smollm2-xattention-thresholds.yaml`` (per-layer, per-head tau),
- ``attnzoo/presets/calibration/smollm2-drift-layers.yaml`` (Token Sparse's layer choice),
- presets ``xattention-calibrated`` and ``token-sparse-calibrated`` built from them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from attnzoo.calibration import (
    calibrate_thresholds,
    choose_sparse_layers,
    save_calibration,
    xattention_layer_configs,
)
from attnzoo.config import dump_config
from attnzoo.eval.niah import make_prompt, suite
from attnzoo.models import load_embedded

PRESETS = Path(__file__).resolve().parents[1] / "attnzoo" / "presets"
CAL_SEED, CAL_OFFSET = 7, 40_000  # evaluation: seed 0, offset 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-recall", type=float, default=0.9)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--dense-layers", default="0-1")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tok = load_embedded()
    t0 = time.time()
    prompts = suite(tok, lengths=(2048, 4096), depths=(0.2, 0.6), seed=CAL_SEED, offset=CAL_OFFSET)
    taus = calibrate_thresholds(model, [p.input_ids for p in prompts], stride=args.stride,
                                block_size=args.block_size, target_recall=args.target_recall, progress=True)
    drift = choose_sparse_layers(model, make_prompt(tok, "single", 4096, 0.5, CAL_SEED, CAL_OFFSET).input_ids)
    cal = PRESETS / "calibration"
    save_calibration(taus, cal / "smollm2-xattention-thresholds.yaml")
    save_calibration(drift, cal / "smollm2-drift-layers.yaml")
    lo, hi = (int(x) for x in args.dense_layers.split("-"))
    per_layer = xattention_layer_configs(taus)
    xa = {"name": "xattention-calibrated",
          "description": f"XAttention with per-layer, per-head thresholds calibrated on SmolLM2 to attention "
                         f"recall {args.target_recall} (bench/calibrate_presets.py); layers {lo}-{hi} dense.",
          "default": {"op": "dense"},
          "layers": {f"{lo}-{hi}": {"op": "dense"},
                     **{str(i): {"selector": per_layer[i], "op": "block_sparse"} for i in sorted(per_layer) if i > hi}}}
    (PRESETS / "xattention-calibrated.yaml").write_text(dump_config(xa))
    sparse = drift["sparse_layers"]
    ts = {"name": "token-sparse-calibrated",
          "description": "Token Sparse Attention in the lower-drift half of SmolLM2's layers "
                         "(representation drift, bench/calibrate_presets.py).",
          "default": {"op": "dense"},
          "layers": {str(i): {"compress": {"name": "token_coverage", "coverage": 0.005, "window": 128,
                                           "min_tokens": 1024}, "inner": {"op": "dense"}} for i in sparse}}
    (PRESETS / "token-sparse-calibrated.yaml").write_text(dump_config(ts))
    mean_tau = sum(sum(v) / len(v) for v in taus["thresholds"].values()) / len(taus["thresholds"])
    print(f"calibrated in {time.time() - t0:.0f} s: mean tau {mean_tau:.3f}; sparse layers {sparse}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
