"""Train the shipped Elastic router for the embedded SmolLM2-135M on CPU, then measure it.

    python bench/train_router.py --out bench/results/elastic-smollm2 [--steps 80 --batch 4]

Sparse branch: streaming (sink 64 + local 256, 64-token blocks); targets: retrieval 0.6, other
1.0 (Omega = share of sparse heads). Training samples: seed 100 / haystack offset 80 000; the
held-out measurement uses seed 200 — both disjoint from the evaluation suite (seed 0, offset 0).
Writes log.jsonl, training.png, router.pt (fp16) and summary.json with the held-out Omega of
retrieval vs non-retrieval prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnzoo.models import load_embedded
from attnzoo.training import train_elastic, training_samples
from attnzoo.training.elastic import router_sparsity


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/elastic-smollm2")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 768])
    p.add_argument("--lr", type=float, default=2e-3)
    # the paper's multiplier lr (1e-3) over 300 steps x 48 samples; with ~1/40 of the samples the
    # multipliers must rise faster or CE alone decides (a first run at 1e-3 drifted towards FA
    # everywhere: Omega ~0.6 for both task types after 25 steps)
    p.add_argument("--lambda-lr", type=float, default=0.05)
    p.add_argument("--held-out", type=int, default=12)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_embedded()
    samples = training_samples(tok, args.samples, lengths=args.lengths, seed=100)
    t0 = time.perf_counter()
    router, log = train_elastic(model, samples, steps=args.steps, batch=args.batch, lr=args.lr,
                                lambda_lr=args.lambda_lr, seed=0, out_dir=args.out)
    train_s = time.perf_counter() - t0
    held = training_samples(tok, args.held_out, lengths=(1024,), seed=200)
    omegas = {"retrieval": [], "other": []}
    for s in held:
        ids = s.input_ids[:, : s.n_tokens - int((s.labels[0] != -100).sum())] if s.task_type == "retrieval" \
            else s.input_ids  # retrieval: the prompt without its answer
        omegas[s.task_type].append(router_sparsity(model, router, ids))
    summary = {"train_seconds": round(train_s, 1), "steps": args.steps, "batch": args.batch, "lr": args.lr,
               "lambda_lr": args.lambda_lr,
               "lengths": args.lengths, "held_out_omega": {k: sum(v) / len(v) for k, v in omegas.items() if v},
               "held_out_per_prompt": omegas, "last_step": log.rows[-1]}
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["held_out_omega"]), f"trained in {train_s / 60:.1f} min")


if __name__ == "__main__":
    main()
