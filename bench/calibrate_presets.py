"""Calibrate the shipped presets for the embedded SmolLM2 and write them into attnzoo/presets
(``attnzoo calibrate`` writes one stack for any model; this writes the two shipped presets and
their calibration files at once, with the same functions, ``attnzoo.fitting``).

    python bench/calibrate_presets.py --model FILE.gguf --device cuda --context 32768 \\
        --lengths 8192 16384 32768 --density-budget 0.38 --dense-below 24576 \\
        --token-sparse-dense-below 65536 --token-sparse-target-recall 0.95   # the shipped ones (GPU, YaRN)
    python bench/calibrate_presets.py --dense-below 24576 --token-sparse-dense-below 65536 \\
        --max-threshold 0.96                   # CPU, 2K/4K, recall 0.9: xattention-calibrated until 2026-12-07

The shipped ``xattention-calibrated`` thresholds and ``token-sparse-calibrated`` coverage were made by
``attnzoo calibrate --density-budget 0.38`` and ``attnzoo calibrate --preset token-sparse-calibrated
--target-recall 0.95`` on an H100 (``bash bench/gpu/fidelity_run.sh d``;
bench/results/2026-12-07-h100-fidelity-fits), the same ``fitting`` calls as the first line here (which
fits the coverage on held-out prompts of every ``--lengths``; the CLI run used 16K and 32K).

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

from attnzoo.calibration import save_calibration
from attnzoo.config import dump_config
from attnzoo.eval.compare import resolve_device, resolve_dtype
from attnzoo.eval.niah import make_prompt, suite
from attnzoo.fitting import (
    CAL_OFFSET,
    CAL_SEED,
    HELD_OUT_SEED,
    fit_token_coverage,
    fit_token_sparse,
    fit_xattention,
    fitted_for,
    token_sparse_stack,
    xattention_stack,
)
from attnzoo.models import extend_context, load_model

PRESETS = Path(__file__).resolve().parents[1] / "attnzoo" / "presets"


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
    ap.add_argument("--dense-layers", default="first:2")
    ap.add_argument("--dense-below", type=int, help="write dense_below: {cuda: N} into the XAttention preset")
    ap.add_argument("--dense-tail", type=int, default=64, help="XAttention's dense_tail in the preset (tokens; "
                    "0: none); the held-out density check runs without it")
    ap.add_argument("--max-threshold", type=float, help="cap every head's tau in the preset (0.96 shipped): "
                    "heads calibrated to tau ~ 1 keep nearly every block")
    ap.add_argument("--density-budget", type=float, help="instead of a recall: the thresholds keeping the most "
                    "attention mass at this mean stack density (attnzoo.allocation)")
    ap.add_argument("--token-sparse-dense-below", type=int, help="the same for the Token Sparse preset")
    ap.add_argument("--token-sparse-target-recall", type=float, help="fit Token Sparse's coverage tau to keep this "
                    "attention recall in its layers on the held-out prompts (default: the paper's tau)")
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
    held = suite(tok, lengths=tuple(args.lengths), depths=(0.4, 0.8), tasks=("single", "multikey"),
                 seed=HELD_OUT_SEED, offset=CAL_OFFSET)
    chosen = fit_xattention(model, [p.input_ids.to(device) for p in prompts], target_recall=args.target_recall,
                            max_density=args.max_density, held_out=[p.input_ids for p in held], stride=args.stride,
                            block_size=args.block_size, aggregate=args.aggregate, max_threshold=args.max_threshold,
                            density_budget=args.density_budget, dense_layers=args.dense_layers)
    chosen["calibrated_on"] = about
    drift = fit_token_sparse(model, make_prompt(tok, "single", max(args.lengths), 0.5, CAL_SEED,
                                                CAL_OFFSET).input_ids)
    drift["calibrated_on"] = f"{yarn}one {max(args.lengths)}-token prompt"
    out = args.presets_dir
    # the options the refit command in each preset's fitted_for repeats
    xa_how = f"--density-budget {args.density_budget}" if args.density_budget else ""
    ts_how = f"--target-recall {args.token_sparse_target_recall}" if args.token_sparse_target_recall else ""
    save_calibration(chosen, out / "calibration" / "smollm2-xattention-thresholds.yaml")
    xa = xattention_stack(chosen, fit=fitted_for(model, "xattention-calibrated", xa_how),
                          dense_layers=args.dense_layers, dense_tail=args.dense_tail,
                          max_threshold=args.max_threshold, dense_below=args.dense_below)
    (out / "xattention-calibrated.yaml").write_text(dump_config(xa))
    ts_fit = fitted_for(model, "token-sparse-calibrated", ts_how)
    ts = token_sparse_stack(drift, fit=ts_fit, dense_below=args.token_sparse_dense_below)
    if args.token_sparse_target_recall is not None:
        drift["coverage_fit"] = fit_token_coverage(model, ts, [p.input_ids for p in held],
                                                   args.token_sparse_target_recall)
        ts = token_sparse_stack(drift, fit=ts_fit, dense_below=args.token_sparse_dense_below,
                                coverage=drift["coverage_fit"]["coverage"])
    save_calibration(drift, out / "calibration" / "smollm2-drift-layers.yaml")
    (out / "token-sparse-calibrated.yaml").write_text(dump_config(ts))
    taus = chosen["thresholds"]
    mean_tau = sum(sum(v) / len(v) for v in taus.values()) / len(taus)
    how = f"density budget {args.density_budget}" if args.density_budget else f"recall {chosen['target_recall']}"
    print(f"calibrated in {time.time() - t0:.0f} s: {how}, mean tau {mean_tau:.3f}; "
          f"sparse layers {drift['sparse_layers']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
