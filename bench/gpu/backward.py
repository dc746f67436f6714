"""Block-sparse backward on the GPU: the key-major dK/dV kernel (as shipped, and with its walk
split over query heads and query blocks) against the fp32-atomic one it replaced, beside dense
attention's backward (PyTorch's default SDPA, the fastest dense here), at the shapes router
training and long-context prefill use.

    python3 bench/gpu/backward.py [--out DIR]

Per shape and density: forward + backward ms (CUDA events, median of 10 after warm-up), the
gradients of both paths compared (rel err), and achieved TFLOP/s (forward 4*N^2*D*H*density/2
causal FLOPs, backward 2.5x that, the usual convention). Writes ``backward.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune import cuda_ms, random_plan  # noqa: E402

from attnzoo import ops, settings  # noqa: E402

# (tokens, query heads, KV heads, head dim): SmolLM2-135M's geometry at router-training lengths,
# and a Llama-8B-like layer at 32K
SHAPES = [(16384, 9, 3, 64), (4096, 9, 3, 64), (32768, 32, 8, 128)]
DENSITIES = (0.2, 0.5)
# (name, key-major?, (split heads, query-block split) or None for launch_config's)
VARIANTS = [("key-major", True, None), ("split-heads", True, (True, 1)), ("split-heads-q4", True, (True, 4)),
            ("atomic", False, None)]


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for n, hq, hkv, d in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(args.batch, h, n, d, device=dev, dtype=torch.bfloat16, generator=g)
                   for h in (hq, hkv, hkv))
        dout = torch.randn(args.batch, hq, n, d, device=dev, dtype=torch.bfloat16, generator=g)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]

        def fwd_bwd(fn):
            def run():
                for t in leaves:
                    t.grad = None
                fn().backward(dout)
            return run

        dense = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        dense_ms = cuda_ms(dense)
        flops = 4 * n * n * d * hq * args.batch / 2 * 3.5  # causal forward + 2.5x backward
        print(f"N={n} H={hq}/{hkv} D={d}: dense SDPA fwd+bwd {dense_ms:.2f} ms "
              f"({flops / dense_ms / 1e9:.0f} TFLOP/s)", flush=True)
        for density in DENSITIES:
            plan = random_plan(n, hkv, 64, density, dev)
            grads, times = {}, {}
            for name, key_major, split in VARIANTS:
                with settings.override(attention_key_major_backward=key_major, attention_backward_split=split):
                    run = fwd_bwd(lambda plan=plan: ops.block_sparse(q, k, v, plan, backend="triton"))
                    run()
                    grads[name] = [t.grad.clone() for t in leaves]
                    times[name] = cuda_ms(run)
            kept = float(plan.density())  # kept pairs over the causal pairs
            err = max(rel(a, b) for name in grads for a, b in zip(grads[name], grads["atomic"], strict=True))
            row = dict(n=n, hq=hq, hkv=hkv, d=d, density=kept, dense_ms=dense_ms, max_rel_err=err,
                       **{f"{name.replace('-', '_')}_ms": ms for name, ms in times.items()})
            rows.append(row)
            print(f"   density {kept:.2f}: " + ", ".join(
                f"{name} {ms:.2f} ms ({dense_ms / ms:.2f}x dense, {flops * kept / ms / 1e9:.0f} TFLOP/s)"
                for name, ms in times.items()) + f"; grads rel err vs atomic <= {err:.1e}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "backward.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                              "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
