"""Quest decode on the CPU: free-running agreement with full's 32 greedy tokens at a 2K cache, with
Quest in every layer vs the first two layers dense at decode (as the Quest paper runs it), and
(``--local``) with a local window of 256 tokens inside the budget.

    python bench/results/2026-12-07-cpu-decode-pilot/pilot.py [--local]
"""

from __future__ import annotations

import json
import sys

import torch

from attnzoo.eval.decode_agreement import decode_agreement, text_prompts
from attnzoo.models import load_model


def quest(budget: int, dense_first: int, local: int = 0) -> dict:
    sel = {"name": "quest", "page_size": 16, "budget": budget, **({"local": local} if local else {})}
    part = {"op": "dense", "decode": {"selector": sel, "op": "block_sparse"}}
    layers = {f"first:{dense_first}": {"op": "dense"}} if dense_first else {}
    return {"name": f"quest-{budget}-dense{dense_first}", "default": part, "layers": layers}


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    prompts = text_prompts(tok, 2048, 8)
    if "--local" in sys.argv:
        stacks = {f"quest-{b} local 256": quest(b, 0, 256) for b in (512, 1024)}
    else:
        stacks = {f"quest-{b} (first {d} dense)": quest(b, d) for b in (512, 1024) for d in (0, 2)}
    out = decode_agreement(model, prompts, stacks, new_tokens=32)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
