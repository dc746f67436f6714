"""The fidelity half of `attnzoo compare`: copy accuracy, logit fidelity and attention recall.

Every copy prompt (``attnzoo.eval.copy``) goes through ``full`` first, whose log-probabilities over
the prompt's plain-text window are kept, then through every other preset (rotated per prompt):
one teacher-forced forward pass each gives the copy score, the KL and top-1 agreement against
full on the plain text, the density used and the prefill time. On the first prompt of each length
a ``RecallProbe`` rides along (that pass is not timed: the probe's work would count) and records
recall and output error per layer and head.

Full attention's own copy accuracy per (length, depth) cell is the instrument's validity: where it
copies less than ``MIN_FULL_COPY``, no stack can be rated there, so such cells are flagged and
left out of every copy figure (KL and recall need no task and cover every cell).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..integrations.hf_patch import patch
from ..stack import DensityMeter
from .copy import copy_accuracy
from .fidelity import log_probs, logit_fidelity
from .recall import RecallProbe
from .stats import bootstrap_ci, paired_difference

MIN_FULL_COPY = 0.25


@torch.no_grad()
def _forward(model, ids, keep: int, sync) -> tuple[torch.Tensor, float]:
    sync()
    t0 = time.perf_counter()
    logits = model(ids, use_cache=False, logits_to_keep=keep).logits
    sync()
    return logits, time.perf_counter() - t0


def run_copy(model, presets: list, stacks: dict, prompts: list, *, device: str, warmup: bool,
             recall_rows: int | None = 64, progress: bool = True, on_prompt=None, fit=None) -> dict:
    """Per preset, one record per prompt (``summarise_copy`` turns them into the report).
    ``recall_rows``: query rows the recall probe samples per layer (None: no recall).
    ``on_prompt``: called with the records after each prompt (a checkpoint). ``fit``: called with
    each prompt's length before it runs, returns the YaRN factor the model then has
    (``attnzoo.models.fit_context``); None leaves the model as it is."""
    from tqdm import tqdm

    if "full" not in presets:
        raise ValueError(f"presets must include 'full' (every fidelity figure is paired with it), got {presets}")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    others = [p for p in presets if p != "full"]
    records: dict[str, list] = {name: [] for name in presets}
    meters = {name: DensityMeter() for name in presets}
    warm: set = set()
    probed: set = set()
    bar = tqdm(total=len(presets) * len(prompts), desc="copy", disable=not progress, unit="prompt")
    for i, p in enumerate(prompts):
        factor = fit(p.length) if fit is not None else None
        ids = p.input_ids.to(device)
        keep = p.n_tokens - p.first_logit
        a, b = p.window[0] - p.first_logit, p.window[1] - p.first_logit
        probe_now = recall_rows is not None and p.length not in probed
        probed.add(p.length)
        full_logp = None
        k = i % len(others) if others else 0
        for name in ["full", *others[k:], *others[:k]]:
            bar.set_postfix_str(f"{name} copy@{p.n_tokens} d{p.depth:g}")
            meter = meters[name]
            probe = RecallProbe(recall_rows) if probe_now else None
            with patch(model, stacks[name], meter=meter, probe=probe):
                if warmup and (name, p.n_tokens) not in warm:
                    _forward(model, ids, 1, sync)
                    warm.add((name, p.n_tokens))
                meter.reset()
                logits, seconds = _forward(model, ids, keep, sync)
            if full_logp is None:
                full_logp = log_probs(logits[0, a:b])
            copied, scored = copy_accuracy(logits, p)
            fid = logit_fidelity(full_logp, logits[0, a:b])
            rec = {"length": p.length, "depth": p.depth, "segment": p.segment, "tokens": p.n_tokens,
                   "distance": p.distance, "copied": copied, "scored": scored, "copy": copied / scored,
                   "kl": fid["kl"], "top1": fid["top1"], "density": meter.mean(),
                   "prefill_s": None if probe is not None else seconds, "yarn_factor": factor}
            if probe is not None:
                rec["recall_layers"] = probe.layers()
            records[name].append(rec)
            del logits
            bar.update(1)
        if on_prompt is not None and i + 1 < len(prompts):
            on_prompt(records)
    bar.close()
    return records


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _layer_recall(recs: list) -> dict | None:
    """Mean over probed prompts and heads, per layer: recall and relative error."""
    probed = [r["recall_layers"] for r in recs if r.get("recall_layers")]
    if not probed:
        return None
    layers = sorted({int(layer) for d in probed for layer in d})
    out = {}
    for layer in layers:
        rows = [d.get(layer, d.get(str(layer))) for d in probed]
        rows = [r for r in rows if r]
        out[str(layer)] = {"recall": _mean(x for r in rows for x in r["recall"]),
                           "rel_error": _mean(x for r in rows for x in r["rel_error"]),
                           "min_head_recall": min(x for r in rows for x in r["recall"])}
    return out


def _scores(recs: list, full: list, informative) -> dict:
    """Copy, KL, top-1, recall, density and speed of one preset over ``recs`` (paired with full)."""
    pairs = list(zip(recs, full, strict=True))
    rated = [(r, f) for r, f in pairs if informative(r)]
    out: dict = {"n_prompts": len(pairs), "n_rated": len(rated)}
    if rated:
        acc = [r["copy"] for r, _ in rated]
        facc = [f["copy"] for _, f in rated]
        out["copy"] = _mean(acc)
        out["copy_ci"] = list(bootstrap_ci(acc))
        out["copy_full"] = _mean(facc)
        out["copy_vs_full"] = out["copy"] / out["copy_full"] if out["copy_full"] else None
        out["copy_diff"] = paired_difference(acc, facc)
    out["kl"] = _mean(r["kl"] for r, _ in pairs)
    out["kl_ci"] = list(bootstrap_ci([r["kl"] for r, _ in pairs]))
    out["top1"] = _mean(r["top1"] for r, _ in pairs)
    out["density"] = _mean(r["density"] for r, _ in pairs)
    timed = [(r, f) for r, f in pairs if r["prefill_s"] and f["prefill_s"]]
    if timed:
        out["prefill_ratio"] = statistics.median(f["prefill_s"] / r["prefill_s"] for r, f in timed)
        out["prefill_ms_median"] = 1e3 * statistics.median(r["prefill_s"] for r, _ in timed)
    layers = _layer_recall(recs)
    if layers:
        out["recall"] = _mean(v["recall"] for v in layers.values())
        out["rel_error"] = _mean(v["rel_error"] for v in layers.values())
        out["min_layer_recall"] = min(v["recall"] for v in layers.values())
        out["recall_layers"] = layers
    return out


def validity(full: list, min_full: float = MIN_FULL_COPY) -> dict:
    """Full attention's mean copy accuracy per ``"length/depth"`` cell, and whether it is rated."""
    cells: dict[str, list] = {}
    for f in full:
        cells.setdefault(f"{f['length']}/{f['depth']:g}", []).append(f)
    return {cell: {"full_copy": _mean(f["copy"] for f in fs), "n_prompts": len(fs),
                   "informative": _mean(f["copy"] for f in fs) >= min_full, "yarn_factor": fs[0].get("yarn_factor")}
            for cell, fs in cells.items()}


def summarise_copy(records: dict, names: dict, settings: dict, min_full: float = MIN_FULL_COPY) -> dict:
    """The ``copy`` part of ``results.json``: per preset overall and per length, and the validity
    table; ``records`` as ``run_copy`` returns them (every preset over the same prompts)."""
    full = records["full"]
    cells = validity(full, min_full)

    def informative(r):
        return cells[f"{r['length']}/{r['depth']:g}"]["informative"]

    rows = {}
    for name, recs in records.items():
        row = {"stack": names.get(name, name), **_scores(recs, full, informative), "prompts": recs}
        by_length = {}
        for n in sorted({r["length"] for r in recs}):
            at = [i for i, r in enumerate(recs) if r["length"] == n]
            by_length[str(n)] = _scores([recs[i] for i in at], [full[i] for i in at], informative)
        row["by_length"] = by_length
        rows[name] = row
    return {"presets": rows, "validity": cells, "min_full_copy": min_full, "settings": settings}
