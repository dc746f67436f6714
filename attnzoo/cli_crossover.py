"""``attnzoo crossover``: measure where each preset's sparse path beats full attention on this
machine, and write the presets with that ``dense_below`` switch and the table that set it."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

from .cli_calibrate import UsageError


def add_parser(sub, csv) -> None:
    p = sub.add_parser("crossover", help="measure each preset's sparse-vs-full crossover on this machine; writes "
                       "the presets with their dense_below switch set to it")
    p.add_argument("--presets", type=csv(str), required=True, help="comma-separated preset names or stack YAML "
                   "paths (each is timed sparse at every length against full)")
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a .gguf file or a local "
                   "Hugging Face causal LM folder")
    p.add_argument("--lengths", type=csv(int), help="prompt lengths in tokens (default: GPU 8192,16384,32768,65536; "
                   "CPU 2048,4096,8192); past the model's context it is YaRN-extended")
    p.add_argument("--reps", type=int, default=3, help="timed repeats per length (full and sparse alternate)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", required=True, help="folder for PRESET.yaml (the switch set) and crossover.md")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def crossover_command(args) -> int:
    import torch

    from .config import dump_config, load_config, preset_spec
    from .crossover import crossover, measure, with_dense_below
    from .eval import compare as cmp
    from .models import load_model

    try:
        device = cmp.resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    lengths = args.lengths or ([8192, 16384, 32768, 65536] if device.startswith("cuda") else [2048, 4096, 8192])
    if any(n < 256 for n in lengths):
        raise UsageError(f"--lengths must be >= 256 tokens each, got {lengths}")
    if args.reps < 1:
        raise UsageError(f"--reps must be >= 1, got {args.reps}")
    specs = {}
    for preset in args.presets:
        try:
            specs[preset] = load_config(preset_spec(preset))
        except (ValueError, OSError) as e:
            raise UsageError(f"--presets: {e}") from None
    model, tok = load_model(args.model, cmp.resolve_dtype(args.dtype, device), device)
    kind = torch.device(device).type
    machine = torch.cuda.get_device_name(device) if kind == "cuda" else f"{platform.machine()} CPU"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Crossovers on {machine}: each preset sparse at every length vs full", "",
             f"- Command: `attnzoo {' '.join(sys.argv[1:])}`", f"- Commit: `{_commit()}`",
             f"- Machine: {machine}, torch {torch.__version__}", "",
             "Median prefill of the same prompt (a NIAH prompt of each length), full and the preset alternating "
             f"in {args.reps} rounds after a warm-up each. dense_below = the shortest measured length from which "
             "the sparse path is at least as fast at every longer measured length.", ""]
    for preset, spec in specs.items():
        rows = measure(model, tok, preset, lengths, args.reps,
                       progress=lambda r, p=preset: print(f"  {p} {r['length']}: full {r['full_ms']:.1f} ms, sparse "
                                                           f"{r['sparse_ms']:.1f} ms ({r['ratio']:.2f}x), density "
                                                           f"{r['density']:.3f}", flush=True))
        value, why = crossover(rows)
        name = spec.get("name", Path(preset).stem)
        (out / f"{name}.yaml").write_text(f"# dense_below on {kind} measured by attnzoo crossover on {machine}: "
                                          f"{why} (table: crossover.md)\n"
                                          + dump_config(with_dense_below(spec, kind, value)))
        lines += [f"## {name}: dense_below {{{kind}: {value}}}" if value else f"## {name}: no switch on {kind}",
                  "", why + ".", "", "| tokens | full ms | sparse ms | ratio | density |", "|---|---|---|---|---|"]
        lines += [f"| {r['length']:,} | {r['full_ms']:.1f} | {r['sparse_ms']:.1f} | {r['ratio']:.2f}x | "
                  f"{r['density']:.3f} |" for r in rows]
        lines.append("")
        print(f"{name}: {why}; wrote {out / (name + '.yaml')}")
    (out / "crossover.md").write_text("\n".join(lines))
    print(f"wrote {out / 'crossover.md'}")
    return 0
