"""Density and attention recall of every registered selector on real q/k.

    python bench/selector_quality.py [--tokens 4096] [--out bench/results]

Captures post-RoPE q/k of every layer of the embedded SmolLM2-135M-Instruct on a prompt of
``--tokens`` tokens of CPython's documentation (offline text), runs each selector at its default
settings on every layer, and reports density and attention recall (share of the true softmax
mass kept) averaged over layers, heads and query rows. Writes a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import attnzoo
from attnzoo.eval import attention_recall
from attnzoo.integrations.hf import capture_qk
from attnzoo.models import load_embedded

VARIANTS = {  # extra configurations worth reporting beside the defaults
    "xattention per_kv_head": {"name": "xattention", "per_kv_head": True},
    "xattention tau=0.8": {"name": "xattention", "threshold": 0.8},
}


def prompt_ids(tok, n_tokens: int, offset: int = 0) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tok(text[offset: offset + n_tokens * 8], return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"not enough text for {n_tokens} tokens")
    return ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_embedded()
    ids = prompt_ids(tok, args.tokens)
    qk = capture_qk(model, input_ids=ids)
    specs = {name: {"name": name} for name in attnzoo.available("selector")} | VARIANTS
    rows = {}
    for label, spec in specs.items():
        sel = attnzoo.create("selector", spec)
        dens, rec, secs = [], [], 0.0
        for layer in sorted(qk):
            q, k = qk[layer]
            t0 = time.perf_counter()
            plan = sel(q, k)
            secs += time.perf_counter() - t0
            dens.append(plan.density())
            rec.append(attention_recall(q, k, plan))
        rows[label] = {"density": sum(dens) / len(dens), "recall": sum(rec) / len(rec),
                       "select_s_per_layer": secs / len(qk), "min_recall_layer": min(rec),
                       "per_layer_density": dens, "per_layer_recall": rec}
        print(f"{label:<26} density {rows[label]['density']:.3f}  recall {rows[label]['recall']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"Selectors on SmolLM2-135M-Instruct q/k (30 layers, 9 q / 3 kv heads), {args.tokens}-token prompt "
              f"of CPython docs, default settings.\n"
              f"Command: `python bench/selector_quality.py --tokens {args.tokens}`\n\n"
              "| selector | mean density | mean attention recall | worst layer recall | select time / layer |\n"
              "|---|---|---|---|---|\n")
    lines = [f"| {k} | {v['density']:.3f} | {v['recall']:.3f} | {v['min_recall_layer']:.3f} | "
             f"{v['select_s_per_layer'] * 1e3:.0f} ms |" for k, v in rows.items()]
    md = header + "\n".join(lines) + "\n"
    (out / f"selector-quality-{args.tokens}.md").write_text(md)
    (out / f"selector-quality-{args.tokens}.json").write_text(json.dumps(rows, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
