"""Attention calls alone, per preset, on the real model's q/k/v (CPU).

A whole CPU prefill of the embedded SmolLM2 at 2-3K tokens is mostly its MLPs, so the prefill
ratios of ``attnzoo compare`` hide what a sparse preset does to attention itself. This captures
every layer's q, k and v from one prompt (after RoPE, as the attention function sees them), then
times each preset's stack over all layers, presets interleaved with the order rotated per round;
``full`` (the first preset) is the baseline of each ratio.

    python bench/cpu_attention_calls.py [--length 3072] [--reps 5] full xattention topk-blocks

Routers that read pre-RoPE keys (the elastic presets) are not supported here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnzoo.config import preset_spec
from attnzoo.eval.niah import suite
from attnzoo.integrations.hf import use_attention
from attnzoo.models import load_model
from attnzoo.stack import CallContext, DensityMeter, build


def capture_qkv(model, ids) -> dict:
    """``{layer: (q, k, v)}`` of one prefill, attention itself by SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = {}

    def fn(module, query, key, value, attention_mask, **kw):
        got[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    with use_attention(model, fn, prefix="attnzoo_bench_capture"), torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    return got


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="+")
    ap.add_argument("--length", type=int, default=3072)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    model, tok = load_model("embedded", torch.float32, "cpu")
    ids = suite(tok, (args.length,), (0.5,), ("single",), seed=0)[0].input_ids
    layers = capture_qkv(model, ids)
    stacks = {n: build(preset_spec(n)) for n in args.presets}

    def run(name, meter=None):
        for layer, (q, k, v) in layers.items():
            stacks[name](layer, q, k, v, CallContext(layer_idx=layer, scale=q.shape[-1] ** -0.5, cache={},
                                                      meter=meter))

    times = {n: [] for n in args.presets}
    density = {}
    with torch.no_grad():
        for n in args.presets:  # untimed first call per preset: per-shape caches; its density
            meter = DensityMeter()
            run(n, meter)
            density[n] = meter.mean()
        for r in range(args.reps):
            order = args.presets[r % len(args.presets):] + args.presets[: r % len(args.presets)]
            for n in order:
                t = time.perf_counter()
                run(n)
                times[n].append(time.perf_counter() - t)
    base = statistics.median(times[args.presets[0]])
    print(f"{len(layers)} layers, {ids.shape[1]} tokens, {args.reps} interleaved rounds, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | attention s (median) | vs first | range s | density |\n|---|---|---|---|---|")
    for n in args.presets:
        md = statistics.median(times[n])
        print(f"| {n} | {md:.2f} | {base / md:.2f}x | {min(times[n]):.2f}-{max(times[n]):.2f} | {density[n]:.3f} |")


if __name__ == "__main__":
    main()
