"""What `attnzoo compare` shows: the markdown table, the Pareto plot, results.json.

The runner (``attnzoo.eval.compare``) measures; this module only formats what it returns.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound at 0 and 1 and for few prompts, where the
    normal approximation gives intervals outside [0, 1])."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the interval always holds p; at 0 of n or n of n rounding put a bound a hair past it (1e-17),
    # which made the Pareto plot's error bars negative and stopped a run at its checkpoint
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


def paired_vs_full(records: list, full: list) -> dict:
    """The answers a preset lost and gained against ``full`` on the same prompts, and the exact
    two-sided McNemar (sign) test's p-value for that difference. Both ran the same prompts, so the
    prompts only one of them answered are what tells them apart: two overlapping Wilson intervals
    say less (6/45 against 7/45 may be one prompt lost, or four lost and three gained)."""
    pairs = list(zip(records, full, strict=True))
    lost = sum(1 for r, f in pairs if f["correct"] and not r["correct"])
    gained = sum(1 for r, f in pairs if r["correct"] and not f["correct"])
    n = lost + gained
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n) if n else 1.0
    return {"answers_lost": lost, "answers_gained": gained, "paired_p": p}


def summarise(per_prompt: dict, peaks: dict, names: dict, meta: dict) -> dict:
    """The ``results.json`` dict from every preset's per-prompt records (equal counts; ``names``:
    preset -> stack name, ``peaks``: preset -> peak bytes, ``meta``: settings and machine)."""
    rows: dict[str, dict] = {}
    if not any(per_prompt.values()):  # no NIAH prompts in this run (or none answered yet)
        return {"presets": rows, **meta}
    for name, rs in per_prompt.items():
        n_correct = sum(r["correct"] for r in rs)
        rows[name] = {
            "stack": names[name],
            "accuracy": n_correct / len(rs),
            "accuracy_ci": list(wilson_interval(n_correct, len(rs))),
            "density": sum(r["density"] for r in rs) / len(rs),
            "prefill_s": sum(r["prefill_s"] for r in rs) / len(rs),
            "peak_memory_mib": peaks[name] / 2**20,
            "n_prompts": len(rs),
            "prompts": rs,
        }
    full = rows["full"]
    for r in rows.values():
        # the median of per-prompt ratios (each prompt ran through every preset back to back): one
        # slow prefill (a JIT compile, a load spike) moves a mean of times, not this
        ratios = sorted(f["prefill_s"] / x["prefill_s"] for f, x in zip(full["prompts"], r["prompts"], strict=True))
        r["prefill_ratio"] = statistics.median(ratios)  # > 1: faster than full attention
        r["prefill_ratio_range"] = [ratios[0], ratios[-1]]
        # None (not nan) where full attention answered nothing: there is no ratio to report
        r["accuracy_vs_full"] = r["accuracy"] / full["accuracy"] if full["accuracy"] else None
        r.update(paired_vs_full(r["prompts"], full["prompts"]))
        r["by_length"] = _by_length(r["prompts"], full["prompts"], meta.get("settings", {}).get("lengths", ()))
    return {"presets": rows, **meta}


def _by_length(rs: list, full: list, lengths=()) -> dict:
    """Per target length: prompts, correct answers, accuracy interval, density, median ratio."""
    out: dict = {}
    for r, f in zip(rs, full, strict=True):
        out.setdefault(str(r.get("length") or _nearest(r["tokens"], lengths)), []).append((r, f))
    table = {}
    for length, pairs in out.items():
        n, correct = len(pairs), sum(r["correct"] for r, _ in pairs)
        table[length] = {"n_prompts": n, "correct": correct, "accuracy": correct / n,
                         "accuracy_ci": list(wilson_interval(correct, n)),
                         "density": sum(r["density"] for r, _ in pairs) / n,
                         "prefill_ms_median": 1e3 * statistics.median(r["prefill_s"] for r, _ in pairs),
                         "prefill_ratio": statistics.median(f["prefill_s"] / r["prefill_s"] for r, f in pairs)}
    return table


def _nearest(tokens: int, lengths) -> int:
    """The target length of a prompt recorded before results kept it (prompts fall a few tokens short)."""
    return min(lengths, key=lambda n: abs(n - tokens)) if lengths else tokens


def header(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    device = m.get("device_name") or m.get("device", "cpu")
    ctx = f", YaRN x{s['yarn_factor']}" if s.get("yarn_factor", 1) > 1 else ""
    partial = "" if s.get("complete", True) else " **PARTIAL: the run stopped before its last prompt**;"
    if s.get("sparse_everywhere"):
        partial += " presets sparse at every length (--sparse-everywhere: dense_below switches off);"
    base_reps = s.get("baseline_prefill_repeats", s.get("prefill_repeats", 1))
    base = f" (full: {base_reps})" if base_reps != s.get("prefill_repeats", 1) else ""
    niah = (f"NIAH lengths {s['lengths']}, tasks {s['tasks']}, depths {s['depths']}; " if "lengths" in s else "")
    copy = (f"copy lengths {s['copy_lengths']}, depths {s['copy_depths']}, {s['copy_per_cell']} per cell; "
            if "copy_lengths" in s else "")
    return (f"{s['model']} ({s.get('dtype', 'float32')}{ctx}) on {device}; torch {m['torch']}; {niah}{copy}"
            f"prefill: median of {s.get('prefill_repeats', 1)}{base}, presets interleaved;{partial}")


def table(results: dict) -> str:
    lines = ["| preset | accuracy [95% CI] | vs full (answers lost / gained, paired p) | mean density | "
             "mean prefill s | prefill ratio: median (per-prompt range) | peak MiB | prompts |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["presets"].items():
        vs = "n/a (full 0)" if r["accuracy_vs_full"] is None else f"{r['accuracy_vs_full']:.0%}"
        if r.get("answers_lost") is not None and name != "full":
            vs += f" (-{r['answers_lost']} / +{r['answers_gained']}, p {r['paired_p']:.2f})"
        spread = r.get("prefill_ratio_range")
        ratio = f"{r['prefill_ratio']:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        ci = r.get("accuracy_ci")
        acc = f"{r['accuracy']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r.get('stack') or name} | {acc} | {vs} | {r['density']:.3f} | "
                     f"{r['prefill_s']:.3f} | {ratio} | {r['peak_memory_mib']:.0f} | {r['n_prompts']} |")
    return "\n".join(lines)


def table_by_length(results: dict) -> str:
    """One row per preset, one column per prompt length: accuracy (correct / prompts, 95 %
    interval), density and the median per-prompt prefill ratio at that length."""
    names = list(results["presets"])
    lengths = sorted({int(n) for r in results["presets"].values() for n in r.get("by_length", {})})
    if not lengths:
        return ""
    lines = ["| preset | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name in names:
        r = results["presets"][name]
        cells = []
        for n in lengths:
            c = r["by_length"].get(str(n))
            cells.append("-" if c is None else
                         f"{c['correct']}/{c['n_prompts']} [{c['accuracy_ci'][0]:.2f}, {c['accuracy_ci'][1]:.2f}], "
                         f"density {c['density']:.2f}, {c['prefill_ratio']:.2f}x ({c['prefill_ms_median']:.0f} ms)")
        lines.append(f"| {r.get('stack') or name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(results: dict, path) -> Path:
    """Accuracy (y, with its 95 % interval) vs density (x), one distinct marker per preset (the
    prefill ratio in the legend: a noisy ratio does not resize markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=120)
    markers = "*osDv^<>phXPd8H1234+x|_"
    for i, (name, r) in enumerate(results["presets"].items()):
        color = plt.cm.tab20(i % 20)
        ci = r.get("accuracy_ci")
        if ci:
            # rounded figures can put the interval a hair inside the point: matplotlib refuses that
            err = [[max(r["accuracy"] - ci[0], 0.0)], [max(ci[1] - r["accuracy"], 0.0)]]
            ax.errorbar(r["density"], r["accuracy"], yerr=err,
                        fmt="none", ecolor=color, alpha=0.5, capsize=3)
        ax.scatter(r["density"], r["accuracy"], s=110, alpha=0.8, marker=markers[i % len(markers)],
                   color=color, edgecolors="black", linewidths=0.5,
                   label=f"{r.get('stack', name)}: {r['prefill_ratio']:.2f}x prefill")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=0.7)
    ax.set_xlabel("mean attention density (fraction of causal pairs computed)")
    ax.set_ylabel("NIAH accuracy (exact match; bars: 95% Wilson interval)")
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.05, 1.1)
    s = results["settings"]
    where = results["machine"].get("device_name") or results["machine"].get("device", "cpu")
    ax.set_title(f"{s['model']} on {where}: lengths {s['lengths']}, {results['presets']['full']['n_prompts']} "
                 f"prompts/preset\nlegend: prefill speed ratio vs full attention", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(results: dict, out_dir) -> tuple[Path, Path]:
    """``results.json``, ``results.md`` (header + table) and ``pareto.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = header(results) + "\n\n"
    if "copy" in results:  # the fidelity measures first: they rate stacks where NIAH cannot
        from .fidelity_report import markdown
        from .fidelity_report import pareto_plot as copy_plot

        text += markdown(results["copy"]) + "\n"
    if results["presets"]:
        by_length = table_by_length(results)
        text += (f"## NIAH\n\n{table(results)}\n" +
                 (f"\nPer length (correct / prompts [95% interval], density, median prefill "
                  f"ratio vs full and median prefill):\n\n{by_length}\n" if by_length else ""))
    (out / "results.md").write_text(text)
    if "copy" in results:
        if results["presets"]:
            pareto_plot(results, out / "pareto-niah.png")
        return out / "results.json", copy_plot(results, out / "pareto.png")
    return out / "results.json", pareto_plot(results, out / "pareto.png")


def main(argv=None) -> int:
    """Re-render a run's results.md and pareto.png from its results.json (``python -m
    attnzoo.eval.report DIR``)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder", type=Path, help="a folder holding results.json")
    args = p.parse_args(argv)
    results = json.loads((args.folder / "results.json").read_text())
    rows = results["presets"]
    meta = {k: v for k, v in results.items() if k != "presets"}
    results = summarise({n: r["prompts"] for n, r in rows.items()},
                        {n: r["peak_memory_mib"] * 2**20 for n, r in rows.items()},
                        {n: r.get("stack", n) for n, r in rows.items()}, meta)
    if "copy" in results:
        from .copy_compare import summarise_copy

        c = results["copy"]
        results["copy"] = summarise_copy({n: r["prompts"] for n, r in c["presets"].items()},
                                         {n: r.get("stack", n) for n, r in c["presets"].items()},
                                         c.get("settings", {}), c["min_full_copy"])
    write(results, args.folder)
    print((args.folder / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
