"""Bench helpers: side-by-side ratios printed at the end of the run."""

from __future__ import annotations

import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

from attnzoo import settings

sys.path.insert(0, str(Path(__file__).parent))
# every registered selector is benchmarked: plugins (the README's example, installed by its test
# command, is one) register through the attnzoo.plugins entry points when the registry is read

RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)


def record(group: str, name: str, benchmark, **info) -> None:
    """Remember a finished benchmark's median for the ratio table."""
    if benchmark.stats is None:  # --benchmark-disable: the body ran once, untimed
        return
    RESULTS[group][name] = {"median": benchmark.stats.stats.median, **info}


def _command() -> str:
    args = sys.argv[1:] if sys.argv[0].endswith(("pytest", "__main__.py")) else sys.argv
    return " ".join(["python -m pytest", *args])


def _markdown(rows) -> str:
    import torch

    head = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.\nCommand: `{_command()}`\n\n"
            "| group | case | median s | speedup vs dense | share of dense | density | recall | peak MiB | backend |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    rows = []
    tr = terminalreporter
    tr.section("attnzoo: ratios measured side by side in this run")
    tr.write_line(f"{'group':<28} {'case':<34} {'median s':>9} {'speedup':>8} {'share':>7} {'density':>8} "
                  f"{'recall':>7} {'peak MiB':>9} backend")
    for group, cases in RESULTS.items():
        base = cases.get("dense", {}).get("median")
        for name, r in cases.items():
            ratio = f"{base / r['median']:.2f}x" if base else "-"
            share = f"{r['median'] / base:.1%}" if base else "-"  # of dense attention time
            dens = f"{r['density']:.3f}" if "density" in r else "-"
            recall = f"{r['recall']:.3f}" if "recall" in r else "-"
            peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
            tr.write_line(f"{group:<28} {name:<34} {r['median']:>9.3f} {ratio:>8} {share:>7} {dens:>8} "
                          f"{recall:>7} {peak:>9} {r.get('backend', '')}")
            rows.append([group, name, f"{r['median']:.3f}", ratio, share, dens, recall, peak, r.get("backend", "")])
    out = settings.get("bench_out")
    if out:
        with open(out, "w") as f:
            f.write(_markdown(rows))
        tr.write_line(f"wrote {out}")
