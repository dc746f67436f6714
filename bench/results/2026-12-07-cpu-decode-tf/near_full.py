"""Quest decode reading all but 4 or 16 of a 2K cache's 128 pages: how far free-running agreement falls
when almost nothing is dropped. (CPU, 8 prompts.)

    python bench/results/2026-12-07-cpu-decode-tf/near_full.py
"""

from __future__ import annotations

import json
import time

import torch

from attnzoo.eval.decode_agreement import decode_agreement, text_prompts
from attnzoo.models import load_model


def quest(budget: int) -> dict:
    sel = {"name": "quest", "page_size": 16, "budget": budget}
    return {"name": f"quest-{budget}", "default": {"op": "dense", "decode": {"selector": sel, "op": "block_sparse"}}}


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    prompts = text_prompts(tok, 2048, 8)
    stacks = {"quest-1984 (all but 4 pages)": quest(1984), "quest-1792 (all but 16 pages)": quest(1792)}
    t = time.time()
    print(json.dumps(decode_agreement(model, prompts, stacks, new_tokens=32, teacher_forced=False), indent=1))
    print("seconds", time.time() - t)


if __name__ == "__main__":
    main()
