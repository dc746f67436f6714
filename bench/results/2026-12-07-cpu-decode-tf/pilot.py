"""Quest decode on the CPU at a 2K cache, scored free-running and teacher-forced (issue 39): how the
budget moves each, and how far the free-running measure falls when almost nothing is dropped.

    python bench/results/2026-12-07-cpu-decode-tf/pilot.py [--free-running] [BUDGET ...]   # default 256 512 1024 1792

(``--free-running 1984 1792``: all but 4 / 16 of the 128 pages, free-running agreement only.)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from attnzoo.eval.decode_agreement import decode_agreement, text_prompts
from attnzoo.models import load_model


def quest(budget: int) -> dict:
    sel = {"name": "quest", "page_size": 16, "budget": budget}
    return {"name": f"quest-{budget}", "default": {"op": "dense", "decode": {"selector": sel, "op": "block_sparse"}}}


def main() -> None:
    torch.manual_seed(0)
    free_only = "--free-running" in sys.argv
    budgets = [int(b) for b in sys.argv[1:] if b != "--free-running"] or [256, 512, 1024, 1792]
    model, tok = load_model("embedded")
    prompts = text_prompts(tok, 2048, 8)
    t = time.time()
    out = decode_agreement(model, prompts, {f"quest-{b}": quest(b) for b in budgets}, new_tokens=32,
                           teacher_forced=not free_only)
    print(json.dumps(out, indent=1))
    print(f"{time.time() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
