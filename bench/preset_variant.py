"""Write a copy of a preset (or stack YAML) with one field set in every selector of a kind, for
experiments on a GPU before a preset changes:

    python bench/preset_variant.py xattention-calibrated xattention.dense_tail=64 /tmp/v/xac-tail64.yaml

The copy is named ``<name>-<field><value>`` unless ``--name`` says otherwise; it fails when no
selector of that kind is in the stack (a typo would otherwise write an unchanged copy)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from attnzoo.config import dump_config, load_config, preset_spec


def set_selector_field(spec, kind: str, field: str, value) -> int:
    """Set ``field`` in every selector named ``kind`` anywhere in ``spec``; returns how many."""
    n = 0
    if isinstance(spec, dict):
        sel = spec.get("selector")
        if isinstance(sel, dict) and sel.get("name") == kind:
            sel[field] = value
            n += 1
        n += sum(set_selector_field(v, kind, field, value) for k, v in spec.items() if k != "selector")
    elif isinstance(spec, list):
        n += sum(set_selector_field(v, kind, field, value) for v in spec)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a preset name or a stack YAML path")
    ap.add_argument("setting", help="KIND.FIELD=VALUE, the value read as YAML (64, 0.8, [0.9, 0.8])")
    ap.add_argument("out", type=Path)
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    target, _, raw = args.setting.partition("=")
    kind, _, field = target.partition(".")
    if not (kind and field and raw):
        ap.error(f"setting must be KIND.FIELD=VALUE, got {args.setting!r}")
    spec = load_config(preset_spec(args.preset))
    value = yaml.safe_load(raw)
    if not set_selector_field(spec, kind, field, value):
        ap.error(f"no '{kind}' selector in {args.preset}")
    spec["name"] = args.name or f"{spec.get('name', Path(args.preset).stem)}-{field.replace('_', '')}{raw}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump_config(spec))
    print(f"{args.out}: {spec['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
