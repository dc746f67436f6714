"""Where a preset's sparse path starts to beat full attention, measured on this machine.

A shipped preset runs dense below some number of keys on a device (``dense_below: {cuda: N}``),
where its sparse path measured slower than dense. ``measure`` times the preset with no switch
(sparse at every length) against ``full`` on the same prompts, interleaved in one process, and
``crossover`` reads the switch off the table: the shortest measured length from which the sparse
path wins at every longer measured length. ``attnzoo crossover`` (``cli_crossover``) writes the
preset with that switch and the table beside it.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time

import torch

from .config import load_config, preset_spec, without_dense_below

__all__ = ["measure", "crossover", "with_dense_below"]


def _prefill_ms(model, ids) -> float:
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync()
    return (time.perf_counter() - t) * 1e3


def measure(model, tok, preset: str, lengths, reps: int = 3, progress=None) -> list[dict]:
    """Per length: full's and the sparse preset's median prefill (ms), their ratio, the preset's
    density. The two alternate within each repeat (order flipped every repeat), after one untimed
    warm-up each (compiles, per-shape caches); lengths past the model's context are YaRN-extended."""
    from . import patch
    from .eval.niah import make_prompt
    from .models import extend_context
    from .stack import DensityMeter, build

    sparse = build(without_dense_below(load_config(preset_spec(preset)))).for_model(model)
    full = build(load_config(preset_spec("full"))).for_model(model)
    device = next(model.parameters()).device
    rows = []
    for n in lengths:
        factor = extend_context(model, n)
        ids = make_prompt(tok, "single", n, 0.5, seed=0).input_ids[:, -n:].to(device)
        meter = DensityMeter()
        with patch(model, sparse, meter=meter):
            _prefill_ms(model, ids)
            density = meter.mean()
        with patch(model, full):
            _prefill_ms(model, ids)
        times = {"full": [], "sparse": []}
        gc.collect()
        for r in range(reps):
            for label in (("full", "sparse") if r % 2 == 0 else ("sparse", "full")):
                with patch(model, full if label == "full" else sparse):
                    times[label].append(_prefill_ms(model, ids))
        f, s = statistics.median(times["full"]), statistics.median(times["sparse"])
        rows.append({"length": n, "tokens": int(ids.shape[1]), "yarn_factor": factor, "full_ms": f,
                     "sparse_ms": s, "ratio": f / s, "density": density})
        if progress is not None:
            progress(rows[-1])
    return rows


def crossover(rows: list[dict]) -> tuple[int | None, str]:
    """``(dense_below, why)`` from ``measure``'s rows: the shortest measured length from which the
    sparse path is at least as fast as full at that and every longer length (None: it wins at every
    measured length, no switch); if it loses at the longest, twice that length (dense wherever it
    was measured)."""
    rows = sorted(rows, key=lambda r: r["length"])
    if not rows:
        raise ValueError("no measurements")
    first = len(rows)
    for i in range(len(rows) - 1, -1, -1):
        if rows[i]["ratio"] < 1.0:
            break
        first = i
    if first == 0:
        return None, f"sparse at least as fast as full at every measured length ({rows[0]['length']} and up)"
    if first == len(rows):
        top = rows[-1]["length"]
        return 2 * top, f"sparse slower than full up to {top} tokens (the longest measured): dense below {2 * top}"
    return rows[first]["length"], (f"sparse slower than full at {rows[first - 1]['length']} tokens, at least as "
                                   f"fast from {rows[first]['length']}")


def with_dense_below(spec: dict, device_type: str, value: int | None) -> dict:
    """``spec`` with the ``dense_below`` entry for ``device_type`` set to ``value`` (None: removed)
    on every layer node that has a sparse path (a selector, router or compression) and on every
    nested node that already has one; other devices' entries are kept."""
    out = copy.deepcopy(spec)

    def visit(node, top: bool):
        if not isinstance(node, dict):
            return
        if "dense_below" in node or (top and any(key in node for key in ("selector", "router", "compress"))):
            table = dict(node.get("dense_below") or {})
            if value is None:
                table.pop(device_type, None)
            else:
                table[device_type] = int(value)
            node.pop("dense_below", None)
            if table:
                node["dense_below"] = table
        for child in [*(node.get("branches") or {}).values(), node.get("inner")]:
            visit(child, False)

    visit(out.get("default"), True)
    for node in (out.get("layers") or {}).values():
        visit(node, True)
    return out
