"""Host-side cost of one attention call of a preset's layer on the GPU: wall time per call against
the kernels' time, and a cProfile of the Python work (the part that makes a sparse layer slower
than dense attention at 8K-16K, where a call's kernels take ~0.1-0.3 ms).

    python3 bench/gpu/host_profile.py [--preset xattention] [--length 8192] [--calls 200]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnzoo  # noqa: E402
from attnzoo.config import load_config, preset_spec, without_dense_below  # noqa: E402
from attnzoo.models import EMBEDDED_SHAPE  # noqa: E402
from attnzoo.stack import CallContext  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="xattention")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args()
    stack = attnzoo.build(without_dense_below(load_config(preset_spec(args.preset)))).for_model(EMBEDDED_SHAPE)
    node = stack.node_for(args.layer)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 9, args.length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 3, args.length, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    pre = k.transpose(1, 2).contiguous()
    ctx = CallContext(layer_idx=args.layer, scale=0.125, pre_rope_keys=pre)
    with torch.no_grad():
        for _ in range(5):
            node(q, k, v, ctx)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            node(q, k, v, ctx)
        host = (time.perf_counter() - t0) / args.calls * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.calls * 1e3
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(args.calls):
            node(q, k, v, ctx)
        e.record()
        torch.cuda.synchronize()
        print(f"{args.preset} @ {args.length}: host {host:.3f} ms per call (time to enqueue), "
              f"wall {wall:.3f} ms, events {s.elapsed_time(e) / args.calls:.3f} ms")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            node(q, k, v, ctx)
        prof.disable()
        torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
