"""``attnzoo calibrate``: fit a preset's model-specific parts to a model and write a stack file
(``attnzoo compare --presets my-stack.yaml`` takes it)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .fitting import FITTABLE


class UsageError(ValueError):
    """A command-line mistake: printed as one line, exit status 2 (``attnzoo.cli`` re-exports it)."""


# presets whose every part fits any model: nothing to calibrate, they run as shipped
ANY_MODEL = ("full", "xattention", "streaming", "topk-blocks", "token-sparse", "token-sparse-xattention")
ROUTED = ("elastic-fa-xa", "elastic-fa-streaming", "elastic-xa-streaming")


def add_parser(sub, csv) -> None:
    p = sub.add_parser("calibrate", help="fit a preset's model-specific parts (per-head thresholds, Token Sparse "
                       "layers) to a model; writes a stack file")
    p.add_argument("--preset", required=True, help=f"what to fit: {', '.join(FITTABLE)}")
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a .gguf file or a local "
                   "Hugging Face causal LM folder")
    p.add_argument("--out", required=True, help="the stack file to write (.yaml)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--context", type=int, help="extend the model with YaRN to this many tokens first")
    p.add_argument("--lengths", type=csv(int), default=[2048, 4096], help="calibration prompt lengths (default "
                   "2048,4096: the shipped SmolLM2 preset's)")
    p.add_argument("--target-recall", type=csv(float), default=None, help="xattention-calibrated: attention recall "
                   "each head keeps (default 0.9; several values need --max-density); token-sparse-calibrated: also "
                   "fit the coverage tau, the largest that keeps this recall in the compressed layers (default: the "
                   "paper's 0.005, not fitted)")
    p.add_argument("--max-density", type=float, help="with several --target-recall: the highest recall whose "
                   "held-out density is at most this")
    p.add_argument("--density-budget", type=float, help="instead of a recall target: the stack's mean density "
                   "(dense layers count 1.0); each head's threshold is chosen so the heads keep the most attention "
                   "mass at that density, checked on held-out prompts (xattention-calibrated only)")
    p.add_argument("--max-threshold", type=float, default=None, help="cap on every head's tau (heads calibrated "
                   "to ~1 keep nearly every block; default 0.96, the shipped preset's, with a recall target, and "
                   "no cap with --density-budget; 1: no cap)")
    p.add_argument("--dense-layers", default="first:2", help="layers left dense (a layer key: first:2, 0-1)")
    p.add_argument("--dense-tail", type=int, default=64, help="last tokens that keep every block (0: none)")
    p.add_argument("--dense-below", type=int, default=None, help="write dense_below: {cuda: N} (keys below "
                   "which the node runs dense on CUDA; default: the shipped preset's)")


def _check(args):
    from .cli import check_model_device_context
    from .layer_spans import parse_layer_key

    if args.preset in ANY_MODEL:
        raise UsageError(f"--preset {args.preset}: nothing in it is model-specific; it runs on any model as shipped "
                         f"(attnzoo compare --presets {args.preset} --model MODEL)")
    if args.preset in ROUTED or args.preset == "router-table-example":
        raise UsageError(f"--preset {args.preset}: its model-specific part is a head router; train one for your "
                         f"model with attnzoo train elastic --model MODEL (the preset's weights: auto then finds it)"
                         if args.preset in ROUTED else f"--preset {args.preset}: a hand-written per-KV-head table "
                         f"(no command fits it); write one row per layer with one label per KV head")
    if args.preset not in FITTABLE:
        from .config import suggest

        raise UsageError(f"--preset: unknown {args.preset!r}{suggest(args.preset, FITTABLE)}; calibrate fits "
                         f"{', '.join(FITTABLE)}")
    if not args.out.endswith((".yaml", ".yml")):
        raise UsageError(f"--out must name a .yaml file, got {args.out}")
    if args.density_budget is not None:
        if args.preset != "xattention-calibrated":
            raise UsageError(f"--density-budget fits XAttention thresholds; --preset {args.preset} has none")
        if not 0 < args.density_budget <= 1:
            raise UsageError(f"--density-budget must lie in (0, 1], got {args.density_budget}")
        if args.max_density is not None or (args.target_recall and len(args.target_recall) > 1):
            raise UsageError("--density-budget chooses each head's recall itself: drop --target-recall / --max-density")
    if args.target_recall is None:
        args.target_recall = [0.9] if args.preset == "xattention-calibrated" else None
    elif args.preset == "token-sparse-calibrated" and len(args.target_recall) != 1:
        raise UsageError(f"--target-recall: token-sparse-calibrated fits one coverage to one recall, got "
                         f"{args.target_recall}")
    if args.max_threshold is None:
        args.max_threshold = 1.0 if args.density_budget is not None else 0.96
    if args.target_recall and len(args.target_recall) > 1 and args.max_density is None:
        raise UsageError("several --target-recall values need --max-density to choose among them")
    for r in args.target_recall or ():
        if not 0 < r <= 1:
            raise UsageError(f"--target-recall values must lie in (0, 1], got {r}")
    if not 0 < args.max_threshold <= 1:
        raise UsageError(f"--max-threshold must lie in (0, 1], got {args.max_threshold}")
    try:
        parse_layer_key(args.dense_layers, "--dense-layers")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(n < 256 for n in args.lengths):
        raise UsageError(f"--lengths must be >= 256 tokens each, got {args.lengths}")
    return check_model_device_context(args, args.lengths)


def calibrate(args) -> int:
    from .config import dump_config, load_config
    from .eval import compare as cmp
    from .eval.niah import make_prompt, suite
    from .fitting import (
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
    from .models import extend_context, load_model
    from .stack import build

    device = _check(args)
    shipped = load_config(f"preset:{args.preset}")
    below = args.dense_below if args.dense_below is not None else _shipped_dense_below(shipped)
    model, tok = load_model(args.model, cmp.resolve_dtype(args.dtype, device), device)
    factor = extend_context(model, args.context) if args.context else 1
    ctx = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if ctx and max(args.lengths) > ctx:
        raise UsageError(f"--lengths: {max(args.lengths)} tokens is past the model's context ({ctx} tokens); "
                         f"pass shorter --lengths or --context {max(args.lengths)} (YaRN)")
    yarn = f"YaRN x{factor}, " if factor > 1 else ""
    made_on = f"{yarn}prompts of {'/'.join(map(str, args.lengths))} tokens"
    t0 = time.time()
    how = (f"--density-budget {args.density_budget}" if args.density_budget is not None else
           f"--target-recall {','.join(map(str, args.target_recall))}" if args.target_recall else "")
    fit = fitted_for(model, args.preset, how)
    if args.preset == "xattention-calibrated":
        prompts = [p.input_ids for p in suite(tok, lengths=tuple(args.lengths), depths=(0.2, 0.6), seed=CAL_SEED,
                                              offset=CAL_OFFSET)]
        held = [p.input_ids for p in suite(tok, lengths=tuple(args.lengths), depths=(0.4, 0.8),
                                           tasks=("single", "multikey"), seed=HELD_OUT_SEED, offset=CAL_OFFSET)]
        cal = fit_xattention(model, [p.to(device) for p in prompts], target_recall=args.target_recall,
                             max_density=args.max_density, held_out=held, max_threshold=args.max_threshold,
                             density_budget=args.density_budget, dense_layers=args.dense_layers)
        cal["calibrated_on"] = made_on
        spec = xattention_stack(cal, fit=fit, dense_layers=args.dense_layers, dense_tail=args.dense_tail,
                                max_threshold=args.max_threshold, dense_below=below)
    else:
        prompt = make_prompt(tok, "single", max(args.lengths), 0.5, CAL_SEED, CAL_OFFSET).input_ids
        cal = fit_token_sparse(model, prompt)
        cal["calibrated_on"] = f"{yarn}one {max(args.lengths)}-token prompt"
        spec = token_sparse_stack(cal, fit=fit, dense_below=below)
        if args.target_recall:  # the coverage tau too, on held-out needle prompts
            held = [p.input_ids for p in suite(tok, lengths=tuple(args.lengths), depths=(0.4, 0.8),
                                               tasks=("single", "multikey"), seed=HELD_OUT_SEED, offset=CAL_OFFSET)]
            cal["coverage_fit"] = fit_token_coverage(model, spec, held, args.target_recall[0])
            cal["coverage_fit"]["held_out"] = (f"{len(held)} NIAH prompts of {'/'.join(map(str, args.lengths))} "
                                               f"tokens (seed {HELD_OUT_SEED})")
            spec = token_sparse_stack(cal, fit=fit, dense_below=below, coverage=cal["coverage_fit"]["coverage"])
            if not cal["coverage_fit"]["met"]:
                print(f"warning: no coverage tau kept attention recall {args.target_recall[0]} in the compressed "
                      f"layers; wrote the smallest tried, {cal['coverage_fit']['coverage']} (its description says so)",
                      file=sys.stderr)
    build(spec).for_model(model)  # what we write must build and fit the model it was made on
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_config(spec))
    side = out.with_suffix(".calibration.yaml")
    side.write_text(dump_config(cal))
    print(f"calibrated {args.preset} for {fit['name'] or 'the model'} in {time.time() - t0:.0f} s; wrote {out} "
          f"(and {side.name}: the calibration itself). Try it: attnzoo compare --model {args.model} --presets {out}")
    return 0


def _shipped_dense_below(spec: dict):
    """The CUDA crossover the shipped preset uses (its sparse layers all carry the same one)."""
    for node in (spec.get("layers") or {}).values():
        value = node.get("dense_below") if isinstance(node, dict) else None
        if isinstance(value, dict) and "cuda" in value:
            return value["cuda"]
    return None
