"""Launch-configuration sweep for the Triton kernels on the hot path, against the fastest dense
attention in the same process (PyTorch's default SDPA), at the embedded model's shape.

    python3 bench/gpu/tune.py [--n 32768] [--heads 9 3] [--dim 64] [--out DIR]

For each kernel (XAttention scoring, top-k pooled scoring, the block-sparse / mixed forward) every
configuration in a small grid is checked against the shipped one's output, then timed with CUDA
events (median of 10 after 3 warm-ups). Also timed: each selector's whole call (scores and
selection) and the torch reference scorer's plan against the Triton one's (must be identical).
Writes ``tune.json`` and prints one line per configuration; the best one per kernel goes into
the kernel's ``launch_config`` by hand, with the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnzoo import ops, settings  # noqa: E402
from attnzoo.ops.kernels import triton_attention as ta  # noqa: E402
from attnzoo.ops.kernels import triton_pooled as tp  # noqa: E402
from attnzoo.ops.kernels import triton_scores as ts  # noqa: E402
from attnzoo.plans import BlockPlan, MixedPlan  # noqa: E402
from attnzoo.selectors.topk_blocks import TopKBlocks  # noqa: E402
from attnzoo.selectors.xattention import XAttention  # noqa: E402


@functools.cache
def _load_run():
    """bench/gpu/run.py, for its CUDA-event timer (no side effects at import)."""
    spec = importlib.util.spec_from_file_location("attnzoo_bench_run", Path(__file__).with_name("run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_ms(fn, reps: int = 10) -> float:
    if not torch.cuda.is_available():  # --smoke under the Triton interpreter: wall time, one rep
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return _load_run().cuda_time(fn, reps)


def top_kernels(fn, n: int = 6) -> dict:
    """GPU ms per kernel name over one call (torch.profiler), the ``n`` largest."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]
    return {e.key: e.device_time_total / 1e3 for e in rows}


def swap(module, fn):
    """Replace ``module.launch_config`` for the duration of a with-block."""
    class _Swap:
        def __enter__(self):
            self.old = module.launch_config
            module.launch_config = fn

        def __exit__(self, *exc):
            module.launch_config = self.old
    return _Swap()


def sweep(name, module, grid, call, ref, results, check):
    print(f"-- {name}", flush=True)
    rows = []
    for cfg in grid:
        try:
            with swap(module, lambda *a, cfg=cfg: dict(cfg)):
                out = call()
                ok = check(out, ref)
                ms = cuda_ms(call)
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is reported
            print(f"   {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
            rows.append({"config": cfg, "error": f"{type(e).__name__}"})
            continue
        print(f"   {cfg}: {ms:.3f} ms{'' if ok else '  MISMATCH'}", flush=True)
        rows.append({"config": cfg, "ms": ms, "ok": ok})
    good = [r for r in rows if r.get("ok")]
    best = min(good, key=lambda r: r["ms"]) if good else None
    results[name] = {"rows": rows, "best": best}
    if best:
        print(f"   best {best['config']}: {best['ms']:.3f} ms", flush=True)


def random_plan(n: int, heads: int, block: int, density: float, dev) -> BlockPlan:
    """A causal plan keeping the diagonal and a random ``density`` share of each head's key
    blocks (the same key blocks for every query block, as XAttention's vertical patterns)."""
    nb = n // block
    idx = torch.stack([torch.randperm(nb, device=dev)[: max(1, int(density * nb))] for _ in range(heads)])
    keep = torch.zeros(1, heads, nb, nb, dtype=torch.bool, device=dev)
    keep[0, torch.arange(heads, device=dev)[:, None], :, idx] = True
    keep |= torch.eye(nb, dtype=torch.bool, device=dev)
    keep &= torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
    return BlockPlan.from_block_mask(keep, block, block, n, n)


def selector_run(name, sel, op, q, k, N, dense_ms, res, dev) -> None:
    """Time a whole selector (scores + selection); its plan must equal the torch scorer's."""
    n_chk = min(N, 8192)
    with settings.override(backend={op: "torch"}):
        a = sel(q[:, :, :n_chk], k[:, :, :n_chk])
    with settings.override(backend={op: "triton"}):
        b = sel(q[:, :, :n_chk], k[:, :, :n_chk])
    same = bool(torch.equal(a.to_block_mask(), b.to_block_mask()))
    ms = cuda_ms(lambda sel=sel: sel(q, k))
    plan = sel(q, k)
    res[f"selector_{name}"] = {"ms": ms, "of_dense": ms / dense_ms, "plan_equal_torch_scorer_at": n_chk,
                               "plan_equal": same, "density": plan.density()}
    print(f"selector {name}: {ms:.3f} ms = {ms / dense_ms:.1%} of dense; plan == torch scorer's at "
          f"{n_chk}: {same}; density {plan.density():.3f}", flush=True)
    if dev == "cuda":  # where the selector's GPU time goes: the largest kernels
        res[f"selector_{name}"]["kernels_ms"] = top_kernels(lambda sel=sel: sel(q, k))
        print("   " + "; ".join(f"{k[:48]} {v:.2f}" for k, v in res[f"selector_{name}"]["kernels_ms"].items()))
    res["_plan"] = plan


def per_pair(res: dict, name: str, density: float, dense_ms: float) -> None:
    """Per-pair throughput against the fastest dense: (dense time x density) / sparse time."""
    best = res[name]["best"]
    res[name]["density"] = density
    if best:
        res[name]["per_pair_of_dense"] = dense_ms * density / best["ms"]
        print(f"   density {density:.3f}: per-pair throughput {res[name]['per_pair_of_dense']:.0%} of SDPA's, "
              f"speed-up {dense_ms / best['ms']:.2f}x", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--heads", type=int, nargs=2, default=[9, 3])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu-tune"))
    p.add_argument("--xa-block", type=int, default=64, help="XAttention block size for the scoring sweeps")
    p.add_argument("--xa-wide", action="store_true", help="XAttention scoring: sweep flattened 64-256 x 128-256 tiles")
    p.add_argument("--xa-tma", action="store_true",
                   help="XAttention scoring: Q/K through TMA descriptors at tiles that fit shared memory, "
                        "beside the shipped config with pointer loads")
    p.add_argument("--xa-gemm", action="store_true",
                   help="XAttention scoring: the reduced product through cuBLAS (fp32 out) and the kernel reading "
                        "it, over epilogue tiles and rows per launch, beside the shipped config")
    p.add_argument("--only", default=None, help="regex: sweep only the sections it matches")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny grid: checks the script")
    args = p.parse_args(argv)
    dev = "cpu" if args.smoke else "cuda"
    dt, N, (Hq, Hkv), D = torch.bfloat16, args.n, args.heads, args.dim
    if args.smoke:
        N = 256
    product = (lambda *xs: [tuple(x[0] for x in xs)]) if args.smoke else itertools.product
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, Hq, N, D, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, Hkv, N, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, Hkv, N, D, device=dev, dtype=dt, generator=g)
    res: dict = {"gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "n": N, "heads": [Hq, Hkv], "dim": D,
                 "xa_block": args.xa_block}

    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    dense_ms = cuda_ms(sdpa)
    flops = 4 * Hq * D * N * (N + 1) / 2
    res["sdpa_default_ms"] = dense_ms
    print(f"SDPA default, causal, {N} tokens, {Hq}/{Hkv} heads, D {D}: {dense_ms:.3f} ms = "
          f"{flops / dense_ms / 1e9:.0f} TFLOP/s", flush=True)
    if dev == "cuda":  # the GEMM configs fall back to the fused kernel without fp32-output bmm
        res["bmm_fp32_out"] = ts._bmm_fp32_out(q.device)
        print(f"bmm(out_dtype=float32) on this torch: {res['bmm_fp32_out']}", flush=True)
    topk_plan = None
    wanted = lambda name: args.only is None or re.search(args.only, name) is not None  # noqa: E731
    with torch.no_grad():
        # -- XAttention scoring (stride 8 and 16, 64-token blocks) --------------------------------
        xb = args.xa_block
        for stride in (8, 16):
            if not wanted(f"xattention_scores_s{stride}"):
                continue
            R = xb // stride
            # every chunk (on a GPU the scorer launches as many as its scratch budget needs: the first
            # alone holds the shortest causal rows, a few % of the work)
            call = lambda stride=stride: torch.cat([w for _, _, w in ops.antidiagonal.antidiagonal_block_scores(  # noqa: E731
                q, k, stride=stride, block_size=xb, chunk_size=N, backend="triton")], 2)
            ref = call()
            # FLATTEN: the column and stride loops pipelined as one (streamed tiles only)
            grid = [dict(QB=rt // R, C_TILE=ct, num_warps=w, num_stages=st, Q_RESIDENT=res, FLATTEN=fl)
                    for res, fl, rt, ct, w, st in product((True, False), (False, True), (64, 128), (64, 128),
                                                          (4, 8), (2, 3, 4))
                    if (not res or rt * stride * D * 2 <= 128 * 1024) and not (res and fl)]
            if args.xa_wide:  # larger tiles, flattened streamed loop only
                grid = [dict(QB=max(1, rt // R), C_TILE=ct, num_warps=w, num_stages=st, Q_RESIDENT=False, FLATTEN=True)
                        for rt, ct, w, st in product((64, 128, 256), (128, 256), (4, 8), (3, 4))]
            if args.xa_tma:  # (rows, columns, warps, stages, flattened): boxes of rows x D and columns x D
                tiles = [(64, 128, 4, 3, True), (64, 128, 8, 3, True), (128, 128, 8, 2, True), (128, 128, 8, 3, True),
                         (128, 128, 4, 3, True), (64, 256, 8, 2, True), (128, 256, 8, 2, True),
                         (128, 128, 8, 3, False), (64, 128, 4, 3, False)]
                grid = [dict(ts.launch_config(R, D, stride), TMA=False)] + [
                    dict(QB=max(1, rt // R), C_TILE=ct, num_warps=w, num_stages=st, Q_RESIDENT=False, FLATTEN=fl,
                         TMA=True) for rt, ct, w, st, fl in (tiles[:1] if args.smoke else tiles)]
            if args.xa_gemm:  # (rows, columns, warps, stages, reduced rows per launch) of the PRE kernel
                tiles = [(rt, 128, w, 2, gr) for rt in (64, 128) for w in (4, 8) for gr in (256, 512, 1024)]
                tiles += [(128, 256, 8, 2, 512), (64, 256, 4, 2, 512)]
                grid = (grid if args.xa_tma else [dict(ts.launch_config(R, D, stride))]) + [
                    dict(QB=max(1, rt // R), C_TILE=ct, num_warps=w, num_stages=st, Q_RESIDENT=False, GEMM=True,
                         GEMM_ROWS=gr) for rt, ct, w, st, gr in (tiles[:1] if args.smoke else tiles)]
            sweep(f"xattention_scores_s{stride}", ts, grid, call, ref, res,
                  lambda out, ref: bool((out - ref).abs().max() <= 1e-3))
        # -- top-k pooled scoring (16-token blocks) -----------------------------------------------
        call = lambda: ops.pooled.pooled_block_scores(q, k, block_size=16, masked=True, backend="triton")  # noqa: E731
        grid = [dict(QB=rt // 16, C_TILE=ct, num_warps=w, num_stages=st)
                for rt, ct, w, st in product((64, 128), (64, 128), (4, 8), (2, 3))]
        if wanted("pooled_scores_b16"):
            ref = call()
            sweep("pooled_scores_b16", tp, grid, call, ref, res, lambda out, ref: bool((out - ref).abs().max() <= 1e-3))

        # -- whole selectors: scores + selection; Triton plan == torch-scorer plan ---------------
        xa = "antidiagonal_scores"
        for name, sel, op in (("xattention_s8", XAttention(stride=8, threshold=0.9, block_size=xb), xa),
                              ("xattention_s16", XAttention(stride=16, threshold=0.9, block_size=xb), xa),
                              ("topk_b16", TopKBlocks(block_size=16, top_k=16), "pooled_scores")):
            if not wanted(f"selector_{name}"):
                continue
            swept = res.get(f"xattention_scores_{name.split('_')[1]}", {}).get("best") if op == xa else None
            with swap(ts, lambda *a, c=swept["config"]: dict(c)) if swept else contextlib.nullcontext():
                selector_run(name, sel, op, q, k, N, dense_ms, res, dev)
            if name == "topk_b16":
                topk_plan = res.pop("_plan")
            res.pop("_plan", None)

        # -- attention forwards --------------------------------------------------------------------
        # TMA: K/V through tensor descriptors (Hopper); BLOCK_N: the key tile (128 only where the
        # plan's key block allows it)
        fwd_grid = [dict(num_warps=w, num_stages=st, TMA=t) for w, st, t in product((4, 8), (2, 3, 4), (False, True))]
        wide_grid = fwd_grid + [dict(c, BLOCK_N=128) for c in fwd_grid]
        small_grid = [dict(num_warps=w, num_stages=st) for w, st in product((2, 4), (2, 3, 4))]
        close = lambda out, ref: bool((out[0].float() - ref[0].float()).abs().max() <= 2e-2)  # noqa: E731
        if topk_plan is not None and wanted("block_sparse_topk_b16"):
            # references from the torch `blocked` backends (not from the Triton kernel's own default)
            call = lambda: ops.block_sparse(q, k, v, topk_plan, return_lse=True, backend="triton")  # noqa: E731
            ref = ops.block_sparse(q, k, v, topk_plan, return_lse=True, backend="blocked")
            sweep("block_sparse_topk_b16", ta, small_grid, call, ref, res, close)
        for block in (64, 128):
            for density in (0.25, 0.1, 0.05):
                name = f"block_sparse_b{block}_d{density}"
                if not wanted(name):
                    continue
                plan = random_plan(N, Hkv, block, density, dev)
                call = lambda plan=plan: ops.block_sparse(q, k, v, plan, return_lse=True, backend="triton")  # noqa: E731
                ref = ops.block_sparse(q, k, v, plan, return_lse=True, backend="blocked")
                sweep(name, ta, wide_grid if block >= 128 else fwd_grid, call, ref, res, close)
                per_pair(res, name, plan.density(), dense_ms)
        if wanted("mixed_1dense_2sparse") and Hkv == 3:
            # one dense KV head of three, the others block-sparse (an Elastic FA-XA layer)
            plan = random_plan(N, Hkv, 64, 0.1, dev)
            mode = torch.tensor([[0, 2, 2]], dtype=torch.int32, device=dev)
            zero = torch.zeros_like(mode)
            mixed = MixedPlan(mode, zero, zero, plan, 64, N, N)
            call = lambda: ops.mixed(q, k, v, mixed, return_lse=True, backend="triton")  # noqa: E731
            sweep("mixed_1dense_2sparse", ta, fwd_grid, call,
                  ops.mixed(q, k, v, mixed, return_lse=True, backend="blocked"), res, close)
        for block in (64, 128):  # the dense mode at the tile a 64- or 128-token plan gives
            name = f"dense_triton_b{block}"
            if not wanted(name):
                continue
            kp = ta.KernelPlan.dense(1, Hq, N, True, dev)
            kp.block_q = kp.block_k = block
            call = lambda kp=kp: ta.forward(q, k, v, kp, None, D ** -0.5)  # noqa: E731
            sweep(name, ta, wide_grid if block >= 128 else fwd_grid, call, (sdpa(),), res, close)
            best = res[name]["best"]
            if best:
                print(f"{name} best: {flops / best['ms'] / 1e9:.0f} TFLOP/s "
                      f"({best['ms'] / dense_ms:.2f}x SDPA's time)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
