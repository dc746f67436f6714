"""How far the copy instrument reaches: full attention's own copy accuracy on the embedded model by
length, depth, segment kind and YaRN factor (the smallest factor that fits each length, and the
one factor a run over every length uses).

    python3 bench/gpu/copy_instrument.py --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/instrument.md

A cell is worth rating stacks on where full attention copies >= 0.25 (attnzoo.eval.copy_compare).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from attnzoo.eval.compare import resolve_device, resolve_dtype
from attnzoo.eval.copy import copy_accuracy, copy_suite
from attnzoo.models import extend_context, load_model


@torch.no_grad()
def full_copy(model, tok, length, depths, per_cell, device, **options) -> dict:
    out = {}
    for p in copy_suite(tok, [length], depths, per_cell, seed=0, **options):
        logits = model(p.input_ids.to(device), use_cache=False, logits_to_keep=p.n_tokens - p.first_logit).logits
        c, n = copy_accuracy(logits, p)
        out.setdefault(p.depth, []).append(c / n)
    return {d: statistics.mean(v) for d, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="8192,16384,32768,65536")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--per-cell", type=int, default=2)
    ap.add_argument("--segment-lens", default="64,32")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = resolve_device("auto")
    model, tok = load_model(args.model, resolve_dtype("auto", device), device)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    seg_lens = [int(x) for x in args.segment_lens.split(",")]
    rows = []
    t0 = time.time()
    # ascending lengths: each gets the smallest YaRN factor that fits it (extend_context only grows)
    for n in lengths:
        extend_context(model, n)
        for segment in ("random", "text"):
            for seg_len in seg_lens:
                acc = full_copy(model, tok, n, depths, args.per_cell, device, segment=segment, segment_len=seg_len,
                                prime=seg_len // 4)
                rows.append((n, f"smallest (x{model.config.max_position_embeddings // 8192})", segment, seg_len, acc))
                print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
    # the model is now extended for the longest length: one factor for every length, as a run uses
    for n in lengths[:-1]:
        acc = full_copy(model, tok, n, depths, args.per_cell, device, segment="random")
        rows.append((n, f"run's (x{model.config.max_position_embeddings // 8192})", "random", 64, acc))
        print(rows[-1], flush=True)
    lines = [f"Full attention's copy accuracy, {args.per_cell} prompts per cell (prime = segment / 4), "
             f"{torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}\n",
             "| length | YaRN | segment | segment tokens | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
             "|---|---|---|---|" + "---|" * len(depths)]
    for n, yarn, segment, seg_len, acc in rows:
        cells = " | ".join(f"{acc[d]:.2f}" for d in depths)
        lines.append(f"| {n:,} | {yarn} | {segment} | {seg_len} | {cells} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
