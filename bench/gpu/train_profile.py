"""Where a router-training step spends its time on the GPU: one Elastic step (batch 2: a 4K and a
16K sample) under torch.profiler, the kernels sorted by GPU time, against the step's wall time.

    python3 bench/gpu/train_profile.py --model FILE.gguf [--sparse xattention]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_router import SPARSE  # noqa: E402

from attnzoo.models import extend_context, load_model  # noqa: E402
from attnzoo.training import train_elastic, training_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sparse", default="xattention", choices=sorted(SPARSE))
    args = ap.parse_args()
    model, tok = load_model(args.model, torch.bfloat16, "cuda")
    extend_context(model, 32768)
    samples = training_samples(tok, 2, lengths=(4096,), seed=100) + training_samples(tok, 2, lengths=(16384,), seed=101)
    samples = [samples[0], samples[2]]
    train_elastic(model, samples, sparse=SPARSE[args.sparse], steps=1, batch=2, progress=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_elastic(model, samples, sparse=SPARSE[args.sparse], steps=1, batch=2, progress=False)
    torch.cuda.synchronize()
    print(f"one step (4K + 16K sample): {time.perf_counter() - t0:.2f} s wall", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_elastic(model, samples, sparse=SPARSE[args.sparse], steps=1, batch=2, progress=False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"GPU kernel time in the step: {gpu_total:.1f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
