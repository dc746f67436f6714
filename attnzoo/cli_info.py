"""``attnzoo info``: versions, devices, every backend in dispatch order with why it is (not)
available on this machine, and every setting with its value."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import settings


def installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    from .ops import dispatch
    from .registry import KINDS, PLUGIN_GROUP, available, plugins

    lines = ["attnzoo " + installed_version("attnzoo"), ""]
    lines.append(f"python             {platform.python_version()} ({platform.machine()})")
    for dist in ("torch", "triton", "flashinfer-python", "transformers"):
        lines.append(f"{dist:<18} {installed_version(dist)}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    lines += [f"devices            {', '.join(devices)}", f"cpu threads        {torch.get_num_threads()}", ""]
    lines.append("dispatch order (each op tries its backends first to last; the first that fits runs):")
    ops = list(dict.fromkeys(b.op for b in dispatch.backends()))
    for op in ops:
        lines.append(f"  {op:<20} {' > '.join(b.name for b in dispatch.backends(op))}")
    lines.append("")
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
    lines.append("settings (attnzoo.settings; value, where it comes from, variable):")
    for row in settings.rows():
        lines.append(f"  {row['name']:<30} {row['value']:<18} {row['source']:<11} {row['env']}")
    lines.append("")
    lines.append("registered components:")
    for kind in KINDS:
        lines.append(f"  {kind}: {', '.join(available(kind)) or '-'}")
    lines.append(f"plugins ({PLUGIN_GROUP} entry points):")
    for name, why in plugins().items():
        lines.append(f"  {name}: {'loaded' if why is None else 'failed: ' + why}")
    if not plugins():
        lines.append("  -")
    return "\n".join(lines)
