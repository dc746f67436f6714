"""Sum fuzz reports (tests/fuzz/conftest.py's markdown) of processes that ran disjoint targets.

    python bench/gpu/fuzz_merge.py out/fuzz/report-*.md --seed S --seconds T --command "..."

Prints one report: the total, the per-target counts, and each process's own header lines
(machine, commit, mismatching tests), so nothing a process reported is lost in the sum.
"""

from __future__ import annotations

import argparse
import collections
import re

ROW = re.compile(r"^\| (?P<target>[^|]+?) \| (?P<n>[\d,]+) \| (?P<d>[\d,]+) \|$")
MISMATCH = re.compile(r"mismatching tests: \*\*(\d+)\*\*")


def merge(paths: list[str]) -> tuple[collections.Counter, collections.Counter, int, list[str]]:
    checked, declined, mismatches, headers = collections.Counter(), collections.Counter(), 0, []
    for path in paths:
        with open(path) as f:
            text = f.read()
        m = MISMATCH.search(text)
        if m is None:
            raise ValueError(f"{path} is not a fuzz report (no 'mismatching tests' line)")
        mismatches += int(m.group(1))
        headers.append(f"- `{path.rsplit('/', 1)[-1]}`: " + "; ".join(
            line[2:] for line in text.splitlines() if line.startswith("- ") and "Command" not in line))
        for line in text.splitlines():
            row = ROW.match(line)
            if row and row["target"] != "target":
                checked[row["target"]] += int(row["n"].replace(",", ""))
                declined[row["target"]] += int(row["d"].replace(",", ""))
    return checked, declined, mismatches, headers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--seed", required=True)
    ap.add_argument("--seconds", type=int, required=True)
    ap.add_argument("--command", required=True)
    a = ap.parse_args()
    checked, declined, mismatches, headers = merge(a.reports)
    print("# Fuzz campaign (gpu profile, processes summed)\n")
    print(f"- cases checked: **{sum(checked.values()):,}**, mismatching tests: **{mismatches}**")
    print(f"- wall time: {a.seconds} s, {len(a.reports)} processes, hypothesis seed: {a.seed}")
    print(f"- Command: `{a.command}`\n")
    print("| target | cases checked | declined by the forced backend |\n|---|---|---|")
    for t in sorted(set(checked) | set(declined)):
        print(f"| {t} | {checked[t]:,} | {declined[t]:,} |")
    print("\nPer process:\n")
    print("\n".join(headers))


if __name__ == "__main__":
    main()
