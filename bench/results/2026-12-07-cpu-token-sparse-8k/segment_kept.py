"""Which share of a copy prompt's hidden segment Token Sparse keeps, per sparse layer and head, at 8K on the
CPU (the shipped token-sparse stack, sparse path on; the selector re-run on each layer's q / k by a probe).

    python bench/results/2026-12-07-cpu-token-sparse-8k/segment_kept.py
"""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.config import load_config, without_dense_below
from attnzoo.context import CallContext
from attnzoo.eval.copy import make_copy_prompt
from attnzoo.models import load_model


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    p = make_copy_prompt(tok, 8192, 0.5, seed=0)
    sel = attnzoo.create("selector", {"name": "token_coverage", "coverage": 0.005, "window": 128, "min_tokens": 1024})
    seg = slice(p.hidden_at, p.hidden_at + p.segment_len)

    def probe(layer, node, q, k, v, ctx):
        if layer >= 15:  # the preset's sparse layers (from:0.5 of 30)
            keep = sel(q, k, CallContext()).keep_mask()[0].float()  # [Hq, N]
            part = keep[:, seg].mean(1)
            print(f"layer {layer}: tokens kept {float(keep.mean()):.3f}, segment kept {float(part.mean()):.3f} "
                  f"(worst head {float(part.min()):.3f})")

    print(f"segment at {p.hidden_at}, repeat at {p.repeat_at}, {p.n_tokens} tokens")
    with torch.no_grad(), attnzoo.patch(model, without_dense_below(load_config("preset:token-sparse")), probe=probe):
        model(p.input_ids)


if __name__ == "__main__":
    main()
