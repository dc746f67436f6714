"""Write a copy of a preset (or stack YAML) with one field set in every selector of a kind, for
experiments on a GPU before a preset changes:

    python bench/preset_variant.py xattention-calibrated xattention.dense_tail=64 /tmp/v/xac-tail64.yaml
    python bench/preset_variant.py xattention-calibrated "xattention.threshold<=0.96" /tmp/v/xac-cap96.yaml

``KIND.FIELD=VALUE`` sets the field; ``KIND.FIELD<=MAX`` caps a number or each number of a list
(per-head thresholds). The copy is named ``<name>-<field><value>`` unless ``--name`` says
otherwise; it fails when no selector of that kind is in the stack (a typo would otherwise write an
unchanged copy)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from attnzoo.config import dump_config, load_config, preset_spec


def set_selector_field(spec, kind: str, field: str, value, cap: bool = False) -> int:
    """Set (or with ``cap``, cap at ``value``) ``field`` in every selector named ``kind`` anywhere in
    ``spec``; returns how many selectors it changed."""
    n = 0
    if isinstance(spec, dict):
        sel = spec.get("selector")
        if isinstance(sel, dict) and sel.get("name") == kind and (not cap or field in sel):
            old = sel.get(field)
            sel[field] = ([min(x, value) for x in old] if cap and isinstance(old, list)
                          else min(old, value) if cap else value)
            n += 1
        n += sum(set_selector_field(v, kind, field, value, cap) for k, v in spec.items() if k != "selector")
    elif isinstance(spec, list):
        n += sum(set_selector_field(v, kind, field, value, cap) for v in spec)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a preset name or a stack YAML path")
    ap.add_argument("setting", help="KIND.FIELD=VALUE, the value read as YAML (64, 0.8, [0.9, 0.8]), or "
                    "KIND.FIELD<=MAX to cap a number or list of numbers")
    ap.add_argument("out", type=Path)
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    cap = "<=" in args.setting
    target, _, raw = args.setting.partition("<=" if cap else "=")
    kind, _, field = target.partition(".")
    if not (kind and field and raw):
        ap.error(f"setting must be KIND.FIELD=VALUE or KIND.FIELD<=MAX, got {args.setting!r}")
    spec = load_config(preset_spec(args.preset))
    value = yaml.safe_load(raw)
    if cap and not isinstance(value, (int, float)):
        ap.error(f"a cap must be a number, got {raw!r}")
    if not set_selector_field(spec, kind, field, value, cap):
        ap.error(f"no '{kind}' selector {'with ' + field + ' ' if cap else ''}in {args.preset}")
    tag = f"{'max' if cap else ''}{field.replace('_', '')}{raw}"
    spec["name"] = args.name or f"{spec.get('name', Path(args.preset).stem)}-{tag}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump_config(spec))
    print(f"{args.out}: {spec['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
