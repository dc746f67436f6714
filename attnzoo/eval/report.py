"""What `attnzoo compare` shows: the markdown table, the Pareto plot, results.json.

The runner (``attnzoo.eval.compare``) measures; this module only formats what it returns.
"""

from __future__ import annotations

import json
import math
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
    return max(0.0, centre - half), min(1.0, centre + half)


def header(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    device = m.get("device_name") or m.get("device", "cpu")
    ctx = f", YaRN x{s['yarn_factor']}" if s.get("yarn_factor", 1) > 1 else ""
    partial = "" if s.get("complete", True) else " **PARTIAL: the run stopped before its last prompt**;"
    return (f"{s['model']} ({s.get('dtype', 'float32')}{ctx}) on {device}; torch {m['torch']}; lengths "
            f"{s['lengths']}, tasks {s['tasks']}, depths {s['depths']}; prefill: median of "
            f"{s.get('prefill_repeats', 1)}, presets interleaved;{partial}")


def table(results: dict) -> str:
    lines = ["| preset | accuracy [95% CI] | vs full | mean density | prefill s | prefill ratio (per-prompt range) | "
             "peak MiB | prompts |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["presets"].items():
        vs = "n/a (full 0)" if r["accuracy_vs_full"] is None else f"{r['accuracy_vs_full']:.0%}"
        spread = r.get("prefill_ratio_range")
        ratio = f"{r['prefill_ratio']:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        ci = r.get("accuracy_ci")
        acc = f"{r['accuracy']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        lines.append(f"| {r.get('stack') or name} | {acc} | {vs} | {r['density']:.3f} | "
                     f"{r['prefill_s']:.3f} | {ratio} | {r['peak_memory_mib']:.0f} | {r['n_prompts']} |")
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
            ax.errorbar(r["density"], r["accuracy"], yerr=[[r["accuracy"] - ci[0]], [ci[1] - r["accuracy"]]],
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
    (out / "results.md").write_text(f"{header(results)}\n\n{table(results)}\n")
    return out / "results.json", pareto_plot(results, out / "pareto.png")
