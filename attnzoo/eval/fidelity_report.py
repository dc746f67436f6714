"""What `attnzoo compare` shows of the fidelity measures (``results["copy"]``, from
``attnzoo.eval.copy_compare.summarise_copy``): tables and the copy-accuracy Pareto plot."""

from __future__ import annotations

from pathlib import Path


def _ci(x, ci) -> str:
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _vs_full(r: dict) -> str:
    if r.get("copy_vs_full") is None:
        return "-"
    d = r["copy_diff"]
    return f"{r['copy_vs_full']:.0%} ({d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}])"


def _opt(r: dict, key: str, fmt: str) -> str:
    return "-" if r.get(key) is None else format(r[key], fmt)


def copy_table(copy: dict) -> str:
    """One row per preset over every length: copy accuracy on the informative cells (95 %
    bootstrap interval over prompts), relative to full with the paired difference, KL and top-1 on
    plain text, attention recall (mean; the weakest layer), output error, density, speed."""
    lines = ["| preset | copy accuracy [95% CI] | vs full: ratio (paired difference [95% CI]) | KL nats [95% CI] | "
             "top-1 agree | recall (weakest layer) | output rel. error | density | prefill ratio | prompts rated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in copy["presets"].items():
        acc = _ci(r["copy"], r["copy_ci"]) if r.get("copy") is not None else "- (no informative cell)"
        recall = "-" if r.get("recall") is None else f"{r['recall']:.3f} ({r['min_layer_recall']:.3f})"
        ratio = "-" if r.get("prefill_ratio") is None else f"{r['prefill_ratio']:.2f}x"
        lines.append(f"| {r.get('stack') or name} | {acc} | {_vs_full(r)} | {_ci(r['kl'], r['kl_ci'])} | "
                     f"{r['top1']:.3f} | {recall} | {_opt(r, 'rel_error', '.3f')} | {r['density']:.3f} | {ratio} | "
                     f"{r['n_rated']}/{r['n_prompts']} |")
    return "\n".join(lines)


def copy_table_by_length(copy: dict) -> str:
    """One row per preset, a column per length: copy accuracy (share of full's), KL, recall,
    density and the median prefill ratio at that length."""
    names = list(copy["presets"])
    lengths = sorted({int(n) for r in copy["presets"].values() for n in r["by_length"]})
    lines = ["| preset | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name in names:
        r = copy["presets"][name]
        cells = []
        for n in lengths:
            c = r["by_length"].get(str(n))
            if c is None:
                cells.append("-")
                continue
            acc = ("copy -" if c.get("copy") is None else
                   f"copy {_ci(c['copy'], c['copy_ci'])}" + (f" ({c['copy_vs_full']:.0%})" if c.get("copy_vs_full")
                                                            is not None else ""))
            parts = [acc, f"KL {c['kl']:.3f}"]
            if c.get("recall") is not None:
                parts.append(f"recall {c['recall']:.3f}")
            parts.append(f"density {c['density']:.2f}")
            if c.get("prefill_ratio") is not None:
                parts.append(f"{c['prefill_ratio']:.2f}x ({c['prefill_ms_median']:.0f} ms)")
            cells.append(", ".join(parts))
        lines.append(f"| {r.get('stack') or name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validity_table(copy: dict) -> str:
    """Full attention's own copy accuracy per length (rows) and depth (columns): cells under the
    bar are flagged and left out of every copy figure."""
    cells = copy["validity"]
    lengths = sorted({int(c.split("/")[0]) for c in cells})
    depths = sorted({float(c.split("/")[1]) for c in cells})
    lines = ["| full's copy accuracy | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for n in lengths:
        row = []
        for d in depths:
            c = cells.get(f"{n}/{d:g}")
            row.append("-" if c is None else f"{c['full_copy']:.2f} (n={c['n_prompts']})" +
                       ("" if c["informative"] else " **uninformative**"))
        factors = {cells[c].get("yarn_factor") for c in cells if c.startswith(f"{n}/")} - {None}
        yarn = f" (YaRN x{factors.pop()})" if len(factors) == 1 else ""
        lines.append(f"| {n:,} tokens{yarn} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def recall_by_layer(copy: dict) -> str:
    """Attention recall per layer (rows; mean over heads and probed prompts), a column per preset."""
    rows = {n: r["recall_layers"] for n, r in copy["presets"].items() if r.get("recall_layers")}
    if not rows:
        return ""
    layers = sorted({int(x) for d in rows.values() for x in d})
    lines = ["| layer | " + " | ".join(copy["presets"][n].get("stack") or n for n in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for layer in layers:
        lines.append(f"| {layer} | " + " | ".join(
            "-" if str(layer) not in d else f"{d[str(layer)]['recall']:.3f}" for d in rows.values()) + " |")
    return "\n".join(lines)


def markdown(copy: dict) -> str:
    bar = copy["min_full_copy"]
    s = copy.get("settings", {})
    out = [f"## Fidelity: copy, logit KL, attention recall\n\nCopy prompts: lengths {s.get('copy_lengths')}, depths "
           f"{s.get('copy_depths')}, {s.get('copy_per_cell')} per cell. A (length, depth) cell where full attention "
           f"copies < {bar:g} of the tokens is uninformative and left out of the copy figures; KL (nats, full || "
           f"stack) and top-1 agreement cover every prompt's plain-text window; recall is the share of full "
           f"attention's softmax mass the stack keeps at sampled query rows (the first prompt of each length).\n",
           validity_table(copy), "", copy_table(copy), "", "Per length:", "", copy_table_by_length(copy)]
    layers = recall_by_layer(copy)
    if layers:
        out += ["", "Attention recall per layer (mean over heads):", "", layers]
    return "\n".join(out) + "\n"


def pareto_plot(results: dict, path) -> Path:
    """Copy accuracy relative to full attention (y, with its 95 % interval) against density (x), one
    panel for every length with an informative cell and one over all lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy = results["copy"]
    presets = copy["presets"]
    lengths = sorted({int(n) for r in presets.values() for n, c in r["by_length"].items() if c.get("copy") is not None})
    panels = [(f"{n:,} tokens", lambda r, n=n: r["by_length"].get(str(n), {})) for n in lengths]
    if len(panels) != 1:
        panels.insert(0, ("all lengths", lambda r: r))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 2.5, 4.6), dpi=110, squeeze=False)
    markers = "*osDv^<>phXPd8H1234+x|_"
    for ax, (title, pick) in zip(axes[0], panels, strict=True):
        for i, (name, r) in enumerate(presets.items()):
            c = pick(r)
            if c.get("copy") is None or not c.get("copy_full"):
                continue
            f = c["copy_full"]
            y = c["copy"] / f
            err = [[max(y - c["copy_ci"][0] / f, 0.0)], [max(c["copy_ci"][1] / f - y, 0.0)]]
            color = plt.cm.tab20(i % 20)
            ax.errorbar(c["density"], y, yerr=err, fmt="none", ecolor=color, alpha=0.5, capsize=3)
            ratio = f": {r['prefill_ratio']:.2f}x prefill" if r.get("prefill_ratio") else ""
            ax.scatter(c["density"], y, s=90, alpha=0.85, marker=markers[i % len(markers)], color=color,
                       edgecolors="black", linewidths=0.5, label=f"{r.get('stack', name)}{ratio}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("mean attention density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("copy accuracy / full attention's (bars: 95% CI)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    where = results["machine"].get("device_name") or results["machine"].get("device", "cpu")
    fig.suptitle(f"{results['settings']['model']} on {where}: long-range copy (informative cells only)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (4.2 * len(panels) + 2.5), 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
