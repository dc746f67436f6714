"""Quest against an oracle at one decode step: the share of full attention's softmax mass (last prompt row
as the decode query, every layer and head of the embedded model, a 2K plain-text prompt) that Quest's pages
keep, beside the best pages by true mass at the same count.

    python bench/results/2026-12-07-cpu-decode-pilot/quest_mass.py
"""

from __future__ import annotations

import math

import torch

import attnzoo
from attnzoo.context import CallContext
from attnzoo.eval.decode_agreement import text_prompts
from attnzoo.models import load_model


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    prompt = text_prompts(tok, 2048, 2)[0]
    caps = {}

    def probe(layer, node, q, k, v, ctx):
        caps[layer] = (q[:, :, -1:].clone(), k.clone())  # the last row as a decode step's query

    with torch.no_grad(), attnzoo.patch(model, {"name": "full", "default": {"op": "dense"}}, probe=probe):
        model(prompt)
    for budget in (256, 512, 1024):
        sel = attnzoo.create("selector", {"name": "quest", "page_size": 16, "budget": budget})
        rows = []
        for layer, (q, k) in sorted(caps.items()):
            kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            p = torch.softmax((q @ kk.transpose(-1, -2))[..., 0, :] / math.sqrt(q.shape[-1]), -1)  # [1, Hq, N]
            plan = sel(q, k, CallContext(decode=True))
            kept = (p * plan.to_mask()[:, :, 0, :]).sum(-1)
            best = p.view(*p.shape[:2], -1, 16).sum(-1).topk(int(plan.kv_counts.max()), -1).values.sum(-1)
            rows.append((layer, float(kept.mean()), float(best.mean())))
        mean = [sum(r[i] for r in rows) / len(rows) for i in (1, 2)]
        print(f"budget {budget}: Quest keeps {mean[0]:.3f}, oracle {mean[1]:.3f}; weakest layers "
              f"{[(r[0], round(r[1], 3), round(r[2], 3)) for r in sorted(rows, key=lambda r: r[1])[:3]]}")


if __name__ == "__main__":
    main()
