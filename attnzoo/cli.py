"""Command line: ``attnzoo info`` (more subcommands arrive with their issues)."""

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and every backend with why it is (not) available")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
