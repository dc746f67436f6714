"""`attnzoo compare`: accuracy vs attention density vs prefill time of stacks on one model.

Every preset (a shipped name or a stack YAML) answers the same NIAH prompts with greedy decoding;
presets are interleaved (each prompt goes through every preset, in an order rotated per prompt).
Per preset: accuracy (exact match), mean attention density actually used during prefill (over
layers and heads; dense layers count 1.0), prefill wall time and its ratio to the ``full`` preset
measured in the same process (with the spread of the per-prompt ratios), and peak memory of one
prefill.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..config import preset_names
from ..integrations.hf import patch
from ..stack import DensityMeter, build
from .memory import peak_memory
from .niah import MAX_NEW_TOKENS, score, suite

DEFAULT_PRESETS = ("full", "xattention", "xattention-calibrated", "streaming", "topk-blocks", "token-sparse",
                   "token-sparse-calibrated", "token-sparse-xattention", "router-table-example",
                   "elastic-fa-xa", "elastic-fa-streaming", "elastic-xa-streaming")
QUICK = {"lengths": (1024,), "tasks": ("single",), "depths": (0.5,)}
# all twelve shipped presets took 9.7 minutes on 2 CPU cores (model cached); widen with --lengths/--tasks/--depths
FULL = {"lengths": (2048, 3072), "tasks": ("single", "multikey"), "depths": (0.1, 0.5, 0.9)}
EVAL_SEED = 0  # calibration and training use other seeds and haystack offsets
EMBEDDED_CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings (checked against the model once loaded)


def _spec(preset: str) -> str:
    if preset.endswith((".yaml", ".yml", ".json")):
        if not Path(preset).is_file():
            from ..config import ConfigError

            raise ConfigError(f"stack file not found: {preset}")
        return preset
    if preset.startswith("preset:"):
        return preset
    if preset not in preset_names():
        from ..config import ConfigError, suggest

        raise ConfigError(f"unknown preset {preset!r}{suggest(preset, preset_names())}. Presets: {preset_names()} "
                          f"(or a path to a stack YAML)")
    return f"preset:{preset}"


def _cache_arg(model) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` in newer transformers (which deprecate
    ``past_key_values``, removal announced for 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _cache_of(out):
    return out["cache"] if "cache" in out else out.past_key_values


@torch.no_grad()
def _answer(model, tok, ids: torch.Tensor, max_new_tokens: int, repeats: int = 1, meter=None):
    """Greedy decode; returns (text, prefill seconds: the median of ``repeats`` prefills). The
    density ``meter`` is reset before each prefill, so it holds one prefill's densities."""
    times = []
    for _ in range(repeats):
        if meter is not None:
            meter.reset()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    cache_arg = _cache_arg(model)
    past, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    for _ in range(max_new_tokens - 1):
        if int(nxt) == tok.eos_token_id:
            break
        out = model(nxt, use_cache=True, **{cache_arg: past})
        past, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    return tok.decode(torch.cat(tokens, 1)[0], skip_special_tokens=True), prefill


def run(presets=DEFAULT_PRESETS, *, lengths=None, tasks=None, depths=None, quick: bool = False,
        max_new_tokens: int | None = None, seed: int = EVAL_SEED, model=None, tok=None, progress: bool = True,
        repeats: int = 1, **templates) -> dict:
    """Run the comparison; returns the ``results.json`` dict. ``repeats``: prefills timed per prompt
    and preset (the median is reported). ``templates``: ``haystack``, ``needle``, ``question`` for
    the prompts (``attnzoo.eval.niah.make_prompt``)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    from tqdm import tqdm

    settings = dict(QUICK if quick else FULL)
    for name, value in (("lengths", lengths), ("tasks", tasks), ("depths", depths)):
        if value:
            settings[name] = tuple(value)
    presets = list(presets)
    if "full" not in presets:
        presets.insert(0, "full")  # the reference for accuracy and speed ratios
    stacks = {p: build(_spec(p)) for p in presets}  # fail on a bad preset before any model work
    if model is None:
        from ..models import load_embedded

        model, tok = load_embedded()
    context = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in settings["lengths"] if context and n > context]
    if too_long:
        raise ValueError(f"lengths {too_long} are past the model's context ({context} tokens)")
    prompts = suite(tok, settings["lengths"], settings["depths"], settings["tasks"], seed=seed, **templates)
    # Presets are interleaved: every prompt goes through every preset before the next prompt, in an
    # order rotated per prompt, so a change in the machine's load lands on all presets alike and
    # each prompt gives one full / preset prefill ratio (the table shows their spread).
    longest = max(prompts, key=lambda p: p.n_tokens)
    per_prompt: dict[str, list] = {name: [] for name in presets}
    peaks = dict.fromkeys(presets, 0)
    meters = {name: DensityMeter() for name in presets}
    bar = tqdm(total=len(presets) * len(prompts), desc="compare", disable=not progress, unit="prompt")
    for i, p in enumerate(prompts):
        budget = max_new_tokens or MAX_NEW_TOKENS[p.task]
        for name in presets[i % len(presets):] + presets[: i % len(presets)]:
            bar.set_postfix_str(f"{name} {p.task}@{p.n_tokens}")
            meter = meters[name]
            meter.reset()
            with patch(model, stacks[name], meter=meter):
                if p is longest:  # peak memory of the longest real prefill (+ its short decode)
                    got = {}
                    peaks[name] = peak_memory(
                        lambda p=p, n=budget: got.update(r=_answer(model, tok, p.input_ids, n, repeats, meter)))
                    text, prefill = got["r"]
                else:
                    text, prefill = _answer(model, tok, p.input_ids, budget, repeats, meter)
            per_prompt[name].append({"task": p.task, "tokens": p.n_tokens, "depth": p.depth,
                                     "answers": list(p.answers), "output": text, "correct": score(text, p.answers),
                                     "prefill_s": prefill, "density": meter.mean()})
            bar.update(1)
    bar.close()
    rows: dict[str, dict] = {}
    for name in presets:
        rs = per_prompt[name]
        rows[name] = {
            "stack": stacks[name].name,
            "accuracy": sum(r["correct"] for r in rs) / len(rs),
            "density": sum(r["density"] for r in rs) / len(rs),
            "prefill_s": sum(r["prefill_s"] for r in rs) / len(rs),
            "peak_memory_mib": peaks[name] / 2**20,
            "n_prompts": len(rs),
            "prompts": rs,
        }
    full = rows["full"]
    for r in rows.values():
        r["prefill_ratio"] = full["prefill_s"] / r["prefill_s"]  # > 1: faster than full attention
        ratios = sorted(f["prefill_s"] / x["prefill_s"] for f, x in zip(full["prompts"], r["prompts"], strict=True))
        r["prefill_ratio_range"] = [ratios[0], ratios[-1]]  # per prompt, same prompt back to back
        # None (not nan) where full attention answered nothing: there is no ratio to report
        r["accuracy_vs_full"] = r["accuracy"] / full["accuracy"] if full["accuracy"] else None
    return {
        "presets": rows,
        "settings": {**{k: list(v) for k, v in settings.items()},
                     "max_new_tokens": max_new_tokens or dict(MAX_NEW_TOKENS), "seed": seed,
                     "prefill_repeats": repeats, "presets_interleaved": True,
                     "quick": quick, "model": "SmolLM2-135M-Instruct (embedded)"},
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def table(results: dict) -> str:
    lines = ["| preset | accuracy | vs full | mean density | prefill s | prefill ratio (per-prompt range) | "
             "peak MiB | prompts |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["presets"].items():
        vs = "n/a (full 0)" if r["accuracy_vs_full"] is None else f"{r['accuracy_vs_full']:.0%}"
        spread = r.get("prefill_ratio_range")
        ratio = f"{r['prefill_ratio']:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        lines.append(f"| {r.get('stack') or name} | {r['accuracy']:.2f} | {vs} | {r['density']:.3f} | "
                     f"{r['prefill_s']:.2f} | {ratio} | {r['peak_memory_mib']:.0f} | {r['n_prompts']} |")
    return "\n".join(lines)


def pareto_plot(results: dict, path) -> Path:
    """Accuracy (y) vs density (x), one distinct marker per preset (the prefill ratio in the legend:
    a noisy ratio does not resize markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=120)
    markers = "*osDv^<>phXPd8H1234+x|_"
    for i, (name, r) in enumerate(results["presets"].items()):
        ax.scatter(r["density"], r["accuracy"], s=110, alpha=0.8, marker=markers[i % len(markers)],
                   color=plt.cm.tab20(i % 20), edgecolors="black", linewidths=0.5,
                   label=f"{r.get('stack', name)}: {r['prefill_ratio']:.2f}x prefill")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=0.7)
    ax.set_xlabel("mean attention density (fraction of causal pairs computed)")
    ax.set_ylabel("NIAH accuracy (exact match)")
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.05, 1.1)
    s = results["settings"]
    ax.set_title(f"{s['model']}: lengths {s['lengths']}, {results['presets']['full']['n_prompts']} prompts/preset"
                 f"\nlegend: prefill speed ratio vs full attention", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(results: dict, out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return out / "results.json", pareto_plot(results, out / "pareto.png")
