"""Quest at decode with a GQA group sharing its pages (``per_kv_head=True``) against a page set per query
head (the paper's), on the CPU at a 2K cache (issue 39): the grouped plan is what lets a decode step read
each KV head's pages once; what does it cost in fidelity at the same token budget?

    python bench/results/2026-12-07-cpu-decode-kv/kv_pilot.py [BUDGET ...]   # default 256 512 1024

Teacher-forced and free-running agreement with full's greedy tokens (8 plain-text prompts of 2,048
tokens, 32 new tokens) and the copy task's repeat decoded step by step (6 prompts, depths 0.1 / 0.5 /
0.9), both variants at each budget in one process.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from attnzoo.eval.copy import copy_suite
from attnzoo.eval.decode_agreement import copy_decode, decode_agreement, text_prompts
from attnzoo.models import load_model


def quest(budget: int, per_kv_head: bool) -> dict:
    sel = {"name": "quest", "page_size": 16, "budget": budget, "per_kv_head": per_kv_head}
    name = f"quest{'-kv' if per_kv_head else ''}-{budget}"
    return {"name": name, "default": {"op": "dense", "decode": {"selector": sel, "op": "block_sparse"}}}


def main() -> None:
    torch.manual_seed(0)
    budgets = [int(b) for b in sys.argv[1:]] or [256, 512, 1024]
    stacks = {s["name"]: s for b in budgets for s in (quest(b, False), quest(b, True))}
    model, tok = load_model("embedded")
    t = time.time()
    agree = decode_agreement(model, text_prompts(tok, 2048, 8), stacks, new_tokens=32, teacher_forced=True)
    print(f"agreement {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    copies = copy_decode(model, copy_suite(tok, (2048,), (0.1, 0.5, 0.9), per_cell=2), stacks)
    print(json.dumps({"agreement": agree, "copy_decode": copies}, indent=1))
    print(f"{time.time() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
