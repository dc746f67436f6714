"""Host-side cost of one attention call per preset on a GPU: wall time per call (back to back),
device time of its kernels, and a cProfile of the host side. Finds where a call is host-bound.

    python3 bench/gpu/overhead.py [--n 8192] [--calls 50] [--profile xattention ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnzoo  # noqa: E402
from attnzoo.models import EMBEDDED_SHAPE  # noqa: E402
from attnzoo.stack import CallContext  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--presets", nargs="+", default=["full", "streaming", "topk-blocks", "xattention", "elastic-fa-xa"])
    p.add_argument("--profile", nargs="*", default=[])
    p.add_argument("--kernels", action="store_true", help="device time per kernel (torch.profiler)")
    p.add_argument("--profiler-first", action="store_true",
                   help="run one torch.profiler session before measuring (does it leave launches slower?)")
    args = p.parse_args(argv)
    dev = "cuda"
    if args.profiler_first:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            torch.ones(8, device=dev).sum().item()
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, h, args.n, 64, device=dev, generator=g, dtype=torch.bfloat16) for h in (9, 3, 3))
    keys = torch.randn(1, args.n, 3, 64, device=dev, generator=g, dtype=torch.bfloat16)
    for name in args.presets:
        stack = attnzoo.build(f"preset:{name}").for_model(EMBEDDED_SHAPE)
        ctx = lambda: CallContext(layer_idx=5, pre_rope_keys=keys, cache={})  # noqa: E731
        with torch.no_grad():
            for _ in range(3):
                stack(5, q, k, v, ctx())
            torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                stack(5, q, k, v, ctx())
            host = (time.process_time() - c) / args.calls * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / args.calls * 1e3
            print(f"{name:16s} N={args.n}: {wall:.3f} ms per call (wall), host CPU {host:.3f} ms per call", flush=True)
            if args.kernels:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        stack(5, q, k, v, ctx())
                    torch.cuda.synchronize()
                by = {}
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        key = e.name.split("<")[0].split("(")[0][-45:]
                        by[key] = by.get(key, 0.0) + e.device_time / 5e3
                top = sorted(by.items(), key=lambda x: -x[1])[:6]
                print("    kernels ms per call:", ", ".join(f"{k} {v:.3f}" for k, v in top), flush=True)
            if name in args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.calls):
                    stack(5, q, k, v, ctx())
                torch.cuda.synchronize()
                prof.disable()
                out = io.StringIO()
                stats = pstats.Stats(prof, stream=out)
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats("attnzoo", 30)  # where the host time goes, by caller
                print(out.getvalue()[-12000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
