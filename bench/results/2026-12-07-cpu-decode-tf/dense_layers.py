"""Quest decode with the layers whose pages keep the least attention mass (0, 1, 2, 8, 23), or layers
0-10, read densely at decode: does free-running agreement rise? (CPU, 2K cache, 8 prompts.)

    python bench/results/2026-12-07-cpu-decode-tf/dense_layers.py
"""

from __future__ import annotations

import json
import time

import torch

from attnzoo.eval.decode_agreement import decode_agreement, text_prompts
from attnzoo.models import load_model


def quest(budget: int, dense_layers) -> dict:
    sel = {"name": "quest", "page_size": 16, "budget": budget}
    part = {"op": "dense", "decode": {"selector": sel, "op": "block_sparse"}}
    return {"name": f"quest-{budget}", "default": part, "layers": {str(i): {"op": "dense"} for i in dense_layers}}


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    prompts = text_prompts(tok, 2048, 8)
    weak, spread = [0, 1, 2, 8, 23], list(range(11))
    stacks = {"quest-512 dense 0,1,2,8,23": quest(512, weak), "quest-256 dense 0,1,2,8,23": quest(256, weak),
              "quest-512 dense 0-10": quest(512, spread), "quest-256 dense 0-10": quest(256, spread)}
    t = time.time()
    print(json.dumps(decode_agreement(model, prompts, stacks, new_tokens=32, teacher_forced=False), indent=1))
    print("seconds", time.time() - t)


if __name__ == "__main__":
    main()
