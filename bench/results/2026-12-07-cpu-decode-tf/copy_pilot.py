"""The copy task's repeat decoded step by step (``attnzoo.eval.decode_agreement.copy_decode``) with Quest's
decode part at 256 / 512 / 1,024 of a 2K cache, against full attention (CPU, embedded model).

    python bench/results/2026-12-07-cpu-decode-tf/copy_pilot.py
"""

from __future__ import annotations

import json
import time

import torch
from pilot import quest  # this folder's pilot.py (the script's directory is on the path)

from attnzoo.eval.copy import copy_suite
from attnzoo.eval.decode_agreement import copy_decode
from attnzoo.models import load_model


def main() -> None:
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    prompts = copy_suite(tok, (2048,), (0.1, 0.5, 0.9), per_cell=2)
    t = time.time()
    out = copy_decode(model, prompts, {f"quest-{b}": quest(b) for b in (256, 512, 1024)})
    print(json.dumps(out, indent=1))
    print("seconds", round(time.time() - t))


if __name__ == "__main__":
    main()
