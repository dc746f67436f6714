"""Command line: ``attnzoo info`` and ``attnzoo compare``."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    from .ops import dispatch
    from .registry import KINDS, available

    lines = ["attnzoo " + _version("attnzoo"), ""]
    lines.append(f"python             {platform.python_version()} ({platform.machine()})")
    for dist in ("torch", "triton", "flashinfer-python", "transformers"):
        lines.append(f"{dist:<18} {_version(dist)}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    lines += [f"devices            {', '.join(devices)}", f"cpu threads        {torch.get_num_threads()}", ""]
    lines.append("backends (per device: available, or why not):")
    for b in dispatch.backends():
        reason = b.available()
        lines.append(f"  {b.op}/{b.name}: {b.description}")
        for dev in ("cpu", "cuda"):
            if dev not in b.devices:
                why = f"device not in {list(b.devices)}"
            elif reason:
                why = reason
            elif b.device_check and b.device_check(dev):
                why = b.device_check(dev)
            elif dev == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device"
            else:
                why = None
            mark = "available" if why is None else f"unavailable: {why}"
            lines.append(f"      {dev:<5} {mark}")
        caps = (f"dtypes={[str(d).replace('torch.', '') for d in b.dtypes]} plans={list(b.plan_kinds)} "
                f"backward={b.backward} lse={b.lse} padding={b.padding} "
                f"head_dims={'any' if b.head_dims is None else list(b.head_dims)}")
        lines.append(f"      {caps}")
    lines.append("")
    lines.append("registered components:")
    for kind in KINDS:
        lines.append(f"  {kind}: {', '.join(available(kind)) or '-'}")
    return "\n".join(lines)


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from e
    return parse


def compare(args) -> int:
    from .eval import compare as cmp

    presets = args.presets or list(cmp.DEFAULT_PRESETS)
    results = cmp.run(presets, lengths=args.lengths, tasks=args.tasks, depths=args.depths, quick=args.quick,
                      max_new_tokens=args.max_new_tokens)
    json_path, png_path = cmp.write(results, args.out)
    print()
    print(cmp.table(results))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and every backend with why it is (not) available")
    c = sub.add_parser("compare", help="accuracy vs attention density vs prefill time of stacks on the embedded model")
    c.add_argument("--presets", type=_csv(str), help="comma-separated preset names or stack YAML paths "
                   "(default: every shipped preset); 'full' is always added as the reference")
    c.add_argument("--lengths", type=_csv(int), help="prompt lengths in tokens (default 2048,3072; quick 1024)")
    c.add_argument("--tasks", type=_csv(str), help="NIAH tasks: single,multikey,multivalue (default single,multikey)")
    c.add_argument("--depths", type=_csv(float), help="needle depths in [0, 1] (default 0.1,0.5,0.9)")
    c.add_argument("--quick", action="store_true", help="one short prompt per preset (CI smoke run)")
    c.add_argument("--max-new-tokens", type=int, help="greedy tokens per answer (default: 32, 64 for multivalue)")
    c.add_argument("--out", default="attnzoo-compare", help="folder for results.json and pareto.png")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info_text())
    elif args.command == "compare":
        return compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
