"""A GQA group's page score as the mean of its heads' Quest bounds instead of their maximum (the
shipped ``per_kv_head``): the torch ``page_scores`` backend swapped for this run only, then the same
measures as kv_pilot.py for Quest per KV head at 512 / 1,024 of a 2K cache.

    python bench/results/2026-12-07-cpu-decode-kv/kv_mean.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch
from kv_pilot import quest  # this folder's kv_pilot.py (the script's directory is on the path)

import attnzoo.ops.pages as P
from attnzoo.eval.decode_agreement import decode_agreement, text_prompts
from attnzoo.models import load_model
from attnzoo.ops import dispatch


def mean_scores(q, lo, hi, *, n_pages, forced_lo, page_size, k=None, key_padding_mask=None, per_kv_head=False,
                own_page=None):
    B, Hq, _, D = q.shape
    Hkv, last = lo.shape[1], n_pages - 1
    if k is not None:
        lo[:, :, last], hi[:, :, last] = P.last_page_bounds(k, last, page_size, key_padding_mask)
    lf, hf, empty = P.finite_bounds(lo[:, :, :n_pages], hi[:, :, :n_pages])
    bound = P.page_bound(q.reshape(B, Hkv, Hq // Hkv, D), lf, hf).mean(2, keepdim=True)  # the group's mean
    page = torch.arange(n_pages, device=q.device)
    scores = torch.where(~empty[:, :, None], P.order_keys(bound), -1.0)
    scores = torch.where((page == 0) | (page >= forced_lo), P.SINK_SCORE, scores)
    return torch.where(page >= last, -1.0, scores)


def main() -> None:
    backends = dispatch._BACKENDS["page_scores"]
    backends[:] = [dataclasses.replace(b, fn=mean_scores) if b.name == "torch" else b for b in backends]
    torch.manual_seed(0)
    model, tok = load_model("embedded")
    stacks = {s["name"]: s for s in (quest(512, True), quest(1024, True))}
    t = time.time()
    out = decode_agreement(model, text_prompts(tok, 2048, 8), stacks, new_tokens=32, teacher_forced=True)
    print(json.dumps(out, indent=1))
    print(f"{time.time() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
