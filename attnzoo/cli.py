"""attnzoo's command line: ``info`` (versions, devices, backends), ``compare`` (accuracy vs density
vs prefill time of stacks on the embedded model or yours), ``calibrate`` (fit a preset to a model),
``crossover`` (where each preset's sparse path beats full on this machine), ``train`` (SSA alignment or
the Elastic router).

A mistake in a command's arguments or in a stack config prints one line and exits with status 2,
before any model loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli_calibrate, cli_crossover, settings
from .cli_calibrate import UsageError
from .cli_info import info_text, installed_version


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from e
    return parse


MIN_CONTEXT, MAX_CONTEXT = 256, 1 << 20




def check_model_device_context(args, lengths) -> str:
    """``--model``, ``--device``, ``--context`` and whether ``lengths`` fit the context, before any
    model loads (compare and train); returns the device."""
    from .eval import compare as cmp

    try:
        device = cmp.resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    if args.context is not None and not MIN_CONTEXT <= args.context <= MAX_CONTEXT:
        raise UsageError(f"--context must lie in [{MIN_CONTEXT}, {MAX_CONTEXT}] tokens, got {args.context}")
    model = Path(args.model)
    if args.model != "embedded" and not model.exists():
        raise UsageError(f"--model: no such file or folder: {args.model} (use 'embedded', a .gguf file or a "
                         f"local Hugging Face model folder)")
    if args.model != "embedded" and not (model.suffix == ".gguf" or (model / "config.json").is_file()):
        raise UsageError(f"--model: {args.model} is neither a .gguf file nor a Hugging Face model folder "
                         f"(no config.json there)")
    # the context the lengths must fit: --context, else the embedded model's (its GPU defaults extend it)
    context = args.context or cmp.EMBEDDED_CONTEXT
    for n in lengths:
        if args.model == "embedded" and n > context:
            raise UsageError(f"--lengths: {n} tokens is past the embedded model's context ({context} tokens); "
                             f"--context {n} extends it with YaRN")
    return device


def _check_compare_args(args) -> dict:
    """Everything checkable before the model loads; returns the haystack options."""
    from .eval.niah import check_settings

    for flag in ("lengths", "depths", "tasks"):
        try:
            check_settings(**{flag: getattr(args, flag) or ()})
        except ValueError as e:
            raise UsageError(f"--{flag}: {e}") from None
    from .eval.compare import EVALS
    from .eval.copy import check_copy_settings

    bad = [e for e in args.evals or () if e not in EVALS]
    if bad or args.evals == []:
        raise UsageError(f"--evals: expected a comma-separated subset of {','.join(EVALS)}, got {args.evals}")
    try:
        check_copy_settings(args.copy_lengths or (), args.copy_depths or (), **_copy_options(args))
    except ValueError as e:
        raise UsageError(f"copy settings: {e}") from None
    if args.copy_per_cell is not None and args.copy_per_cell < 1:
        raise UsageError(f"--copy-per-cell must be >= 1, got {args.copy_per_cell}")
    if args.recall_rows < 0:
        raise UsageError(f"--recall-rows must be >= 0 (0: no recall), got {args.recall_rows}")
    # copy prompts fitted per length (the default) extend the model themselves
    fitted = args.copy_yarn == "per-length"
    check_model_device_context(args, [*(args.lengths or ()), *(() if fitted else args.copy_lengths or ())])
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    for flag in ("repeats", "baseline_repeats"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.haystack is None:
        return {}
    path = Path(args.haystack)
    if not path.is_file():
        raise UsageError(f"--haystack: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UsageError(f"--haystack: cannot read {path} as UTF-8 text ({e.__class__.__name__})") from None
    if len(text.strip()) < 1000:
        raise UsageError(f"--haystack: {path} holds {len(text.strip())} characters; a haystack needs thousands")
    return {"haystack": text}


def _copy_options(args) -> dict:
    """``--segment``, ``--segment-len``, ``--prime``, ``--text-window`` as given (unset: defaults)."""
    names = ("segment", "segment_len", "prime", "text_window")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


DEFAULT_OUT = "attnzoo-compare"


def _fresh_out(args) -> str:
    """Where this run's results go without replacing an earlier run's: the default folder is
    numbered on (``attnzoo-compare-2``, ...); a folder named with ``--out`` needs ``--overwrite``."""
    def taken(path) -> bool:
        return (Path(path) / "results.json").exists()

    if not taken(args.out) or args.overwrite:
        return args.out
    if args.out != DEFAULT_OUT:
        raise UsageError(f"--out {args.out} holds an earlier run's results; pass --overwrite to replace them "
                         f"or another --out")
    n = 2
    while taken(f"{DEFAULT_OUT}-{n}"):
        n += 1
    print(f"attnzoo compare: {DEFAULT_OUT}/ holds an earlier run's results; this run writes {DEFAULT_OUT}-{n}/")
    return f"{DEFAULT_OUT}-{n}"


def compare(args) -> int:
    from .eval import compare as cmp
    from .eval import report

    templates = _check_compare_args(args)
    args.out = _fresh_out(args)  # last: every other mistake first
    presets = args.presets or list(cmp.DEFAULT_PRESETS)
    results = cmp.run(presets, lengths=args.lengths, tasks=args.tasks, depths=args.depths, quick=args.quick,
                      max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                      baseline_repeats=args.baseline_repeats, device=args.device,
                      dtype=args.dtype, model_spec=args.model, context=args.context,
                      checkpoint=lambda partial: report.write(partial, args.out),
                      sparse_everywhere=args.sparse_everywhere, per_cell=args.per_cell, evals=args.evals,
                      copy_lengths=args.copy_lengths, copy_depths=args.copy_depths,
                      copy_per_cell=args.copy_per_cell, copy_options=_copy_options(args),
                      recall_rows=args.recall_rows or None, copy_yarn=args.copy_yarn, **templates)
    json_path, png_path = report.write(results, args.out)
    print()
    print(report.header(results))
    if "copy" in results:
        from .eval.fidelity_report import copy_table, validity_table

        print(validity_table(results["copy"]))
        print()
        print(copy_table(results["copy"]))
        print()
    if results["presets"]:
        print(report.table(results))
    print(f"\nwrote {json_path}, {json_path.with_name('results.md')} and {png_path}")
    return 0


def _load_model(name: str, dtype, device):
    from .models import load_model

    return load_model(name, dtype, device)


def _targets(text: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"targets look like retrieval=0.6,other=1.0; got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = float(v)
    return out


def train(args) -> int:
    from .config import preset_spec
    from .eval import compare as cmp
    from .models import extend_context
    from .stack import build
    from .training import train_elastic, train_ssa, training_samples

    if args.method == "ssa" and (args.resume or args.checkpoint_every or args.micro_batch_tokens or args.prior_steps):
        raise UsageError("--resume, --checkpoint-every, --micro-batch-tokens and --prior-steps are for elastic "
                         "router training")
    if args.prior_steps < 0 or (args.prior_steps and args.resume):
        raise UsageError(f"--prior-steps must be >= 0 and cannot resume a run, got {args.prior_steps}")
    if not 0.0 <= args.copy_share <= 1.0:
        raise UsageError(f"--copy-share must lie in [0, 1], got {args.copy_share}")
    if args.micro_batch_tokens is not None and args.micro_batch_tokens < 1:
        raise UsageError(f"--micro-batch-tokens must be >= 1, got {args.micro_batch_tokens}")
    device = check_model_device_context(args, args.lengths)
    if args.resume:
        from .training.elastic import checkpoint_run

        if not Path(args.resume).is_file():
            raise UsageError(f"--resume: no such checkpoint file: {args.resume}")
        want = dict(steps=args.steps, batch=args.batch, seed=args.seed, n_samples=args.samples,
                    lr=args.lr or 5e-4, lambda_lr=args.lambda_lr)
        had = checkpoint_run(args.resume)
        if {k: had.get(k) for k in want} != want:  # targets are checked by train_elastic itself
            raise UsageError(f"--resume: {args.resume} is a checkpoint of a run with {had}; "
                             f"these arguments give {want}")
    stack = None if args.stack is None else preset_spec(args.stack)
    if stack is not None:
        build(stack)  # a bad name or file fails before the model loads
    # SSA trains every weight: fp32 masters (bf16 autocast on a GPU) unless a precision is named
    dtype = "float32" if args.method == "ssa" and args.dtype == "auto" else args.dtype
    model, tok = _load_model(args.model, cmp.resolve_dtype(dtype, device), device)  # checked above
    if args.context is not None:
        extend_context(model, args.context)
    samples = training_samples(tok, args.samples, lengths=args.lengths, seed=args.seed, copy_share=args.copy_share)
    if args.method == "ssa":
        log = train_ssa(model, samples, sparse=stack, steps=args.steps, lr=args.lr or 1e-5, accum=args.batch,
                        trainable=args.trainable, seed=args.seed, out_dir=args.out)
        if args.out:
            model.save_pretrained(args.out + "/model")
            tok.save_pretrained(args.out + "/model")
    else:
        router = None
        if args.prior_steps:
            from .training import route_prior

            router = route_prior(model, samples, targets=args.targets, steps=args.prior_steps, seed=args.seed)
        _, log = train_elastic(model, samples, router, sparse=stack, steps=args.steps, batch=args.batch,
                               lr=args.lr or 5e-4,
                               lambda_lr=args.lambda_lr, targets=args.targets, seed=args.seed, out_dir=args.out,
                               checkpoint_every=args.checkpoint_every, resume=args.resume,
                               micro_batch_tokens=args.micro_batch_tokens)
    last = log.rows[-1]
    print("last step: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    print(f"wrote {args.out}/log.jsonl, training.png" + (", router.pt" if args.method == "elastic" else ", model/"))
    if args.method == "elastic" and args.out:
        from .training.elastic import file_router

        filed = file_router(Path(args.out) / "router.pt")
        print(f"filed the router as {filed} (an Elastic preset's weights: auto finds it for this model)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and still exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="attnzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"attnzoo {installed_version('attnzoo')}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                title="commands", metavar="{info,compare,calibrate,crossover,train}")
    i = sub.add_parser("info", help="versions, devices, every backend with why it is (not) available, and settings")
    i.add_argument("--settings-markdown", action="store_true",
                   help="print only the settings table (defaults) as markdown, as the README shows it")
    c = sub.add_parser("compare", help="accuracy vs attention density vs prefill time of stacks on the embedded model")
    c.add_argument("--presets", type=_csv(str), help="comma-separated preset names or stack YAML paths "
                   "(default: every shipped preset); 'full' is always added as the reference")
    c.add_argument("--lengths", type=_csv(int), help="NIAH prompt lengths in tokens (default: GPU 8192,16384,32768; "
                   "CPU 2048,3072; quick 1024)")
    c.add_argument("--tasks", type=_csv(str), help="NIAH tasks: single,multikey,multivalue (default: GPU all "
                   "three; CPU single,multikey)")
    c.add_argument("--depths", type=_csv(float), help="needle depths in [0, 1] (default: GPU 0.1,0.3,0.5,0.7,0.9, "
                   "every one per length and task; CPU 0.1,0.5,0.9 rotated)")
    c.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model precision (auto: bfloat16 on a GPU, float32 on a CPU)")
    c.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a .gguf file or a local "
                   "Hugging Face causal LM folder")
    c.add_argument("--context", type=int, help="extend the model with YaRN to this many tokens (default: the "
                   "longest default NIAH length where it is past the model's context, 32768 on a GPU; copy prompts "
                   "get the factor that fits each unless --copy-yarn run)")
    c.add_argument("--quick", action="store_true", help="one short prompt per preset (CI smoke run)")
    c.add_argument("--max-new-tokens", type=int, help="greedy tokens per answer (default: 32, 64 for multivalue)")
    c.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json, results.md and pareto.png (default "
                   "attnzoo-compare, numbered on where an earlier run's results are)")
    c.add_argument("--overwrite", action="store_true", help="replace the results an earlier run left in --out")
    c.add_argument("--repeats", type=int, default=1, help="prefills timed per prompt and preset; the median "
                   "is reported (default 1)")
    c.add_argument("--baseline-repeats", type=int, default=3, help="prefills timed per prompt for full, the "
                   "denominator of every ratio (default 3; at least --repeats)")
    c.add_argument("--per-cell", action=argparse.BooleanOptionalAction, default=None,
                   help="a prompt for every length x task x depth (default: on a GPU; on a CPU one depth per "
                        "length x task, rotated)")
    c.add_argument("--sparse-everywhere", action="store_true", help="run every preset's sparse path at every "
                   "length (drop the dense_below switches that run dense attention where sparse measured slower)")
    c.add_argument("--haystack", help="a UTF-8 text file the needles and copy segments hide in (default: "
                   "CPython's documentation)")
    c.add_argument("--evals", type=_csv(str), help="what to measure: niah, copy (copy accuracy, logit KL on plain "
                   "text, attention recall); default both")
    c.add_argument("--copy-lengths", type=_csv(int), help="copy prompt lengths (default: GPU 8192,16384,32768,"
                   "65536; CPU 2048,3072; quick 1024)")
    c.add_argument("--copy-depths", type=_csv(float), help="where the hidden segment sits, in [0, 1] (default: GPU "
                   "0.1,0.5,0.9; CPU 0.1,0.5)")
    c.add_argument("--copy-per-cell", type=int, help="copy prompts per length x depth (default: GPU 16, CPU 1)")
    c.add_argument("--segment", choices=["random", "text"], help="hidden segment: random tokens (default; only "
                   "copying predicts them) or a passage of the documentation")
    c.add_argument("--segment-len", type=int, help="tokens in the hidden segment (default 64)")
    c.add_argument("--prime", type=int, help="repeat tokens given before scoring starts (default 16)")
    c.add_argument("--text-window", type=int, help="plain-text positions scored for KL / top-1 (default 256)")
    c.add_argument("--copy-yarn", choices=["per-length", "run"], default="per-length", help="YaRN for copy prompts: "
                   "the smallest factor that holds each prompt (default; a model extended further than a prompt "
                   "needs copies worse) or the run's one factor")
    c.add_argument("--recall-rows", type=int, default=64, help="query rows per layer the recall probe samples on "
                   "the first copy prompt of each length (0: no recall)")
    cli_calibrate.add_parser(sub, _csv)
    cli_crossover.add_parser(sub, _csv)
    t = sub.add_parser("train", help="SSA alignment training, or Elastic router training (frozen backbone)")
    t.add_argument("method", choices=["ssa", "elastic"])
    t.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a .gguf file or a local HF "
                   "model folder")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model precision (auto: float32 for ssa, which trains the weights; for elastic, whose "
                   "backbone is frozen, bfloat16 on a GPU and float32 on a CPU)")
    t.add_argument("--context", type=int, help="extend the model with YaRN to this many tokens first (e.g. 32768 "
                   "for samples past the embedded model's 8K)")
    t.add_argument("--stack", help="the sparse branch: a preset name or stack YAML (default: ssa topk_blocks 16x16; "
                   "elastic streaming sink 64 + local 256)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch", type=int, default=4, help="samples per step (ssa: accumulation steps)")
    t.add_argument("--samples", type=int, default=64, help="training samples drawn (retrieval and continuation)")
    t.add_argument("--lengths", type=_csv(int), default=[512, 1024], help="sample lengths in tokens")
    t.add_argument("--copy-share", type=float, default=0.0, help="share of the retrieval samples that are long-range "
                   "copy prompts (attnzoo.eval.copy) rather than needle prompts (default 0)")
    t.add_argument("--lr", type=float, help="default: ssa 1e-5, elastic 5e-4")
    t.add_argument("--lambda-lr", type=float, default=1e-3, help="elastic: multiplier ascent lr (paper: 1e-3 for "
                   "300 steps x 48 samples; shorter runs need more, e.g. 0.05)")
    t.add_argument("--trainable", choices=["all", "attention"], default="all", help="ssa: which weights train")
    t.add_argument("--targets", type=_targets, default=None, help="elastic: sparsity targets per task type, "
                   "e.g. retrieval=0.6,other=1.0")
    t.add_argument("--seed", type=int, default=100)
    t.add_argument("--out", default="attnzoo-train", help="folder for log.jsonl, training.png and the weights")
    t.add_argument("--checkpoint-every", type=int, default=None, help="elastic: write OUT/checkpoint.pt every N "
                   "steps (a run resumed from it ends as if never stopped)")
    t.add_argument("--micro-batch-tokens", type=int, default=None, help="elastic: run a step's samples of equal "
                   "length together, at most this many tokens per micro-batch (on an H200: 2.1 s per 16-sample "
                   "step against 4.0 s one sample at a time)")
    t.add_argument("--resume", default=None, help="elastic: continue the run of this checkpoint.pt (same steps, "
                   "batch, samples and seed)")
    t.add_argument("--prior-steps", type=int, default=0, help="elastic: first train the router to hit each task "
                   "type's sparsity target from its input alone, for this many steps (training.route_prior)")
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        if args.command == "train":
            return train(args)
        if args.command == "calibrate":
            return cli_calibrate.calibrate(args)
        if args.command == "crossover":
            return cli_crossover.crossover_command(args)
        if args.command == "info":
            print(settings.markdown() if args.settings_markdown else info_text())
        elif args.command == "compare":
            return compare(args)
    except (UsageError, ConfigError) as e:
        print(f"attnzoo {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
