"""Elastic test-time adaptivity, measured: the share of KV heads a stack's routers send to full
attention on long-range copy prompts against plain documentation text of the same length
(held-out seeds and haystack offsets: neither evaluation's nor training's).

    python bench/router_share.py --preset elastic-fa-xa --lengths 2048 --prompts 8

Prints per length the mean full-attention share on each input kind with 95 % bootstrap intervals
over prompts and the difference (copy minus text) with its interval.
"""

from __future__ import annotations

import argparse

import torch

from attnzoo import patch
from attnzoo.config import load_config, preset_spec, without_dense_below
from attnzoo.eval.compare import resolve_device, resolve_dtype
from attnzoo.eval.copy import copy_suite
from attnzoo.eval.routing import RouteProbe
from attnzoo.eval.stats import bootstrap_ci, paired_difference
from attnzoo.models import extend_context, load_model
from attnzoo.stack import build
from attnzoo.training.data import continuation_sample

HELD_OUT_SEED, HELD_OUT_OFFSET = 300, 120_000


@torch.no_grad()
def fa_share(model, stack, ids, label: str) -> float:
    probe = RouteProbe()
    with patch(model, stack, probe=probe):
        model(ids, use_cache=False, logits_to_keep=1)
    share = probe.share(label)
    if share is None:
        raise ValueError("no routed layer decided anything: is the stack routed, and past its dense crossover?")
    return share


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="elastic-fa-xa")
    ap.add_argument("--label", default="full", help="the branch whose share is reported")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per kind and length")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    model, tok = load_model(args.model, resolve_dtype("auto", device), device)
    lengths = [int(x) for x in args.lengths.split(",")]
    extend_context(model, max(lengths))
    stack = build(without_dense_below(load_config(preset_spec(args.preset))))
    print(f"{args.preset}: share of KV heads on {args.label!r}, {args.prompts} prompts per kind "
          f"({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'})")
    print("| length | copy prompts [95% CI] | plain text [95% CI] | copy - text [95% CI] |\n|---|---|---|---|")
    for n in lengths:
        copies = copy_suite(tok, [n], [0.1, 0.3, 0.5, 0.7, 0.9], -(-args.prompts // 5), seed=HELD_OUT_SEED,
                            offset=HELD_OUT_OFFSET)[: args.prompts]
        texts = [continuation_sample(tok, n, HELD_OUT_SEED * 1000 + i, HELD_OUT_OFFSET) for i in range(args.prompts)]
        c = [fa_share(model, stack, p.input_ids.to(device), args.label) for p in copies]
        t = [fa_share(model, stack, s.input_ids.to(device), args.label) for s in texts]
        d = paired_difference(c, t)
        ci_c, ci_t = bootstrap_ci(c), bootstrap_ci(t)
        print(f"| {n:,} | {sum(c) / len(c):.3f} [{ci_c[0]:.3f}, {ci_c[1]:.3f}] | {sum(t) / len(t):.3f} "
              f"[{ci_t[0]:.3f}, {ci_t[1]:.3f}] | {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
