"""Attention calls alone, per preset, on the real model's q/k/v (CPU).

A whole CPU prefill of the embedded SmolLM2 at 2-3K tokens is mostly its MLPs, so the prefill
ratios of ``attnzoo compare`` hide what a sparse preset does to attention itself. This captures
every layer's q, k and v from one prompt (after RoPE, as the attention function sees them), then
times each preset's stack over all layers, presets interleaved with the order rotated per round;
``full`` (the first preset) is the baseline of each ratio.

    python bench/cpu_attention_calls.py [--length 3072] [--reps 5] full xattention topk-blocks
    python bench/cpu_attention_calls.py --length 4096 --env ATTNZOO_FLEX_MIN_LEN=4096 full xattention

``--env NAME=VALUE`` (repeatable) adds, for every preset but the first, a second run with those
environment variables set (dispatch reads them per call), interleaved with the rest: a backend
choice against the default in one process.

Routers that read pre-RoPE keys (the elastic presets) are not supported here.
"""

from __future__ import annotations

import argparse
import os
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
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = ap.parse_args(argv)
    bad = [item for item in args.env if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        ap.error(f"--env expects NAME=VALUE, got {bad}")
    env = dict(item.split("=", 1) for item in args.env)
    tag = " [" + ",".join(args.env) + "]"
    model, tok = load_model("embedded", torch.float32, "cpu")
    ids = suite(tok, (args.length,), (0.5,), ("single",), seed=0)[0].input_ids
    layers = capture_qkv(model, ids)
    stacks = {n: build(preset_spec(n)) for n in args.presets}
    runs = list(args.presets) + ([n + tag for n in args.presets[1:]] if env else [])

    def run(name, meter=None):
        preset = name.removesuffix(tag)
        saved = {k: os.environ.get(k) for k in env}
        if name != preset:
            os.environ.update(env)
        try:
            for layer, (q, k, v) in layers.items():
                stacks[preset](layer, q, k, v, CallContext(layer_idx=layer, scale=q.shape[-1] ** -0.5, cache={},
                                                           meter=meter))
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old

    times = {n: [] for n in runs}
    density, first = {}, {}
    with torch.no_grad():
        for n in runs:  # a first call per preset, not in the medians: per-shape caches, flex's compile
            meter = DensityMeter()
            t = time.perf_counter()
            run(n, meter)
            first[n] = time.perf_counter() - t
            density[n] = meter.mean()
        for r in range(args.reps):
            order = runs[r % len(runs):] + runs[: r % len(runs)]
            for n in order:
                t = time.perf_counter()
                run(n)
                times[n].append(time.perf_counter() - t)
    base = statistics.median(times[runs[0]])
    print(f"{len(layers)} layers, {ids.shape[1]} tokens, {args.reps} interleaved rounds, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | attention s (median) | vs first | range s | first call s | density |\n|---|---|---|---|---|---|")
    for n in runs:
        md = statistics.median(times[n])
        spread = f"{min(times[n]):.2f}-{max(times[n]):.2f}"
        print(f"| {n} | {md:.2f} | {base / md:.2f}x | {spread} | {first[n]:.2f} | {density[n]:.3f} |")


if __name__ == "__main__":
    main()
