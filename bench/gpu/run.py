"""The GPU run, in one process: check every CUDA backend against the reference, then time them.

    python3 bench/gpu/run.py --out DIR [--budget 540] [--quick]

(``bench/gpu/run.sh`` installs carried wheels first and calls this.) Writes ``DIR/gpu.json``
after every section, so a run cut short still returns what it measured, and ``DIR/gpu.md``:
a machine header, the correctness table and every ratio against its goal. Timings are CUDA
events, median of ``--reps`` (default 20) after warm-up, all ratios taken side by side in this
one process. Sections past the time budget are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attnzoo import build, ops, patch, settings  # noqa: E402
from attnzoo.cli import installed_version  # noqa: E402
from attnzoo.ops.antidiagonal import antidiagonal_block_scores  # noqa: E402
from attnzoo.plans import BlockPlan, MixedPlan  # noqa: E402

T0 = time.time()
RESULTS: dict = {"sections": {}, "skipped": [], "errors": {}}
ARGS = None


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def gpu_time(fn, reps: int) -> float:
    """Mean GPU milliseconds per ``fn()``: ``reps`` calls queued behind a busy-wait kernel, so the
    events time the device's work, not the host's launch latency (a prefill queues its layers
    the same way: the host runs ahead while the GPU works)."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e8))  # ~0.1 s of queued GPU work while the host launches every call
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def rel_err(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def random_plan(B, H, Nq, Nk, b, density, seed=0, device="cuda") -> BlockPlan:
    """Random causal block plan with the sink and diagonal blocks kept, ~``density`` of blocks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    full = BlockPlan.full(1, 1, Nq, Nk, b, b).to_block_mask()[0, 0]
    nqb, nkb = full.shape
    mask = (torch.rand(B, H, nqb, nkb, generator=g) < density) & full
    last = BlockPlan.full(1, 1, Nq, Nk, b, b).last_visible_block()
    mask[..., torch.arange(nqb), last] = True
    mask[..., 0] = True
    return BlockPlan.from_block_mask(mask.to(device), b, b, Nq, Nk)


def section(name: str, est_s: float = 0.0):
    """Decorator: run the section unless the budget is spent; record errors, save after each."""
    def wrap(fn):
        def run():
            left = ARGS.budget - (time.time() - T0)
            if left < est_s:
                RESULTS["skipped"].append(f"{name} (needs ~{est_s:.0f} s, {left:.0f} s left)")
                log(f"SKIP {name}: budget")
                return
            log(f"== {name}")
            try:
                RESULTS["sections"][name] = fn()
            except Exception as e:  # one failing section must not lose the others
                RESULTS["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            save()
        return run
    return wrap


# -- correctness ---------------------------------------------------------------------------------

TOL_BF16 = {"out": 2e-2, "lse": 1e-2, "grad": 5e-2}


def _check(out, lse, ref, ref_lse, grads=None, ref_grads=None) -> dict:
    fin = torch.isfinite(ref_lse)
    row = {"out": rel_err(out, ref),
           "lse": rel_err(lse[fin], ref_lse[fin]) if lse is not None else None}
    if grads is not None:
        row["grad"] = max(rel_err(a, b) for a, b in zip(grads, ref_grads, strict=True))
    row["ok"] = all(row[k] is None or row[k] <= TOL_BF16[k] for k in ("out", "lse", "grad") if k in row)
    return row


def _ref(q, k, v, plan, grad, dout=None):
    qr, kr, vr = (t.detach().float().requires_grad_(grad) for t in (q, k, v))
    out, lse = ops.reference(qr, kr, vr, plan, return_lse=True)
    grads = None
    if grad:
        (out * dout).sum().backward()
        grads = (qr.grad, kr.grad, vr.grad)
    return out, lse, grads


def correctness() -> list:
    rows = []
    dev = "cuda"
    for D in (64, 128):
        for Hq, Hkv in ((8, 2), (16, 2)):
            for Nq, Nk in ((1000, 1000), (488, 1000)):
                name = f"D{D} GQA{Hq // Hkv}:1 N{Nq}x{Nk}"
                g = torch.Generator(device=dev).manual_seed(D + Hq + Nq)
                q = torch.randn(2, Hq, Nq, D, device=dev, generator=g, dtype=torch.bfloat16)
                k = torch.randn(2, Hkv, Nk, D, device=dev, generator=g, dtype=torch.bfloat16)
                v = torch.randn(2, Hkv, Nk, D, device=dev, generator=g, dtype=torch.bfloat16)
                dout = torch.randn(2, Hq, Nq, D, device=dev, generator=g)
                qplan = random_plan(2, Hq, Nq, Nk, 128, 0.4, seed=1)
                kvplan = random_plan(2, Hkv, Nq, Nk, 128, 0.4, seed=2)

                def add(backend, plan, fn, grad):
                    try:
                        qg, kg, vg = (t.clone().requires_grad_(grad) for t in (q, k, v))
                        out, lse = fn(qg, kg, vg, plan)
                        grads = None
                        if grad:
                            (out.float() * dout).sum().backward()
                            grads = (qg.grad, kg.grad, vg.grad)
                        ref, ref_lse, ref_grads = _ref(q, k, v, plan, grad, dout)
                        row = _check(out, lse, ref, ref_lse, grads, ref_grads)
                    except Exception as e:
                        row = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    rows.append({"case": name, "backend": backend, **row})
                    log(f"  {name} {backend}: {rows[-1]}")

                add("triton block_sparse fwd+bwd (q-head plan)", qplan,
                    lambda q, k, v, p: ops.block_sparse(q, k, v, p, return_lse=True, backend="triton"), True)
                add("triton block_sparse fwd+bwd (kv-head plan)", kvplan,
                    lambda q, k, v, p: ops.block_sparse(q, k, v, p, return_lse=True, backend="triton"), True)
                mode = (torch.arange(Hq, device=dev) % 3).int()[None].expand(2, Hq).contiguous()
                mplan = MixedPlan(mode, torch.full_like(mode, 128), torch.full_like(mode, 256), qplan, 128, Nq, Nk)
                add("triton mixed fwd+bwd (dense/streaming/block)", mplan,
                    lambda q, k, v, p: ops.mixed(q, k, v, p, return_lse=True, backend="triton"), True)
                add("flashinfer dense", None,
                    lambda q, k, v, p: ops.dense(q, k, v, return_lse=True, backend="flashinfer"), False)
                add("flashinfer var-block-sparse", kvplan,
                    lambda q, k, v, p: ops.block_sparse(q, k, v, p, return_lse=True, backend="flashinfer"), False)
                nodiag = kvplan.to_block_mask().clone()
                diag = torch.nn.functional.one_hot(kvplan.last_visible_block()[1], nodiag.shape[-1]).bool()
                nodiag[..., 1, :] &= ~diag
                nodiag[..., 1, 0] = True
                p2 = BlockPlan.from_block_mask(nodiag, 128, 128, Nq, Nk)
                add("flashinfer var-block-sparse (split: a row without its diagonal)", p2,
                    lambda q, k, v, p: ops.block_sparse(q, k, v, p, return_lse=True, backend="flashinfer"), False)
                # XAttention scoring: Triton vs the torch backend (fp32 inputs to both)
                try:
                    kw = dict(stride=8, block_size=128, chunk_size=512)
                    # whole score matrices: on a GPU the Triton scorer yields one chunk, not the caller's
                    a, b = (torch.cat([w for _, _, w in antidiagonal_block_scores(x, y, backend=be, **kw)], 2)
                            for x, y, be in ((q.float(), k.float(), "torch"), (q, k, "triton")))
                    err = float((a - b).abs().max())
                    rows.append({"case": name, "backend": "triton xattention scores (abs err vs torch fp32)",
                                 "out": err, "ok": err <= 2e-2})
                except Exception as e:
                    rows.append({"case": name, "backend": "triton xattention scores", "ok": False,
                                 "error": f"{type(e).__name__}: {e}"})
                log(f"  {name} scores: {rows[-1]}")
    return rows


# -- speed ---------------------------------------------------------------------------------------
# Every ratio's dense baseline is the fastest dense attention timed in this process at that shape
# (on an H100 that is PyTorch's default SDPA), and every row reports achieved TFLOP/s beside it.

B, HQ, HKV = 1, 32, 8
HEAD_DIMS = (128, 64)


def qkv(N, seed=0, D=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = lambda h: (B, h, N, D)
    return (torch.randn(shape(HQ), device="cuda", generator=g, dtype=torch.bfloat16),
            torch.randn(shape(HKV), device="cuda", generator=g, dtype=torch.bfloat16),
            torch.randn(shape(HKV), device="cuda", generator=g, dtype=torch.bfloat16))


def causal_tflops(N, D, ms, share=1.0, heads=HQ) -> float:
    """Achieved TFLOP/s of causal attention (4 N^2/2 D flops per head), ``share`` of it computed."""
    return 4 * heads * D * N * (N + 1) / 2 * share / ms / 1e9


def _sdpa(backend=None):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v):
        if backend is None:  # PyTorch's own choice (cuDNN / FA3-class on Hopper)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return call


def dense_candidates() -> dict:
    """Every dense attention this machine can run, by name (FlashInfer only when installed)."""
    from torch.nn.attention import SDPBackend
    c = {"sdpa default": _sdpa(), "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
         "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
         "triton": lambda q, k, v: ops.dense(q, k, v, backend="triton")}
    if installed_version("flashinfer-python"):
        c["flashinfer"] = lambda q, k, v: ops.dense(q, k, v, backend="flashinfer")
    return c


_FASTEST: dict = {}


def fastest_dense(q, k, v) -> tuple[str, float, dict]:
    """(name, ms, every candidate's ms) of the fastest dense attention at this shape, timed here."""
    key = (tuple(q.shape), tuple(k.shape))
    if key not in _FASTEST:
        times = {}
        for name, fn in dense_candidates().items():
            try:
                times[name] = cuda_time(lambda fn=fn: fn(q, k, v), max(5, ARGS.reps // 2))
            except Exception as e:  # a backend that cannot take the shape is reported, not fatal
                RESULTS["errors"][f"dense {name} {key}"] = f"{type(e).__name__}: {e}"[:200]
        best = min(times, key=times.get)
        _FASTEST[key] = (best, times[best], times)
    return _FASTEST[key]


def dense_backends() -> list:
    rows = []
    for D in HEAD_DIMS:
        for N in ARGS.lengths:
            q, k, v = qkv(N, D=D)
            best, ms, times = fastest_dense(q, k, v)
            rows.append({"N": N, "D": D, "fastest": best, "ms": times,
                         "tflops": {n: causal_tflops(N, D, t) for n, t in times.items()}})
            log(f"  N={N} D={D}: fastest {best} ({ms:.2f} ms); {rows[-1]['tflops']}")
    return rows


def block_sparse_sweep() -> list:
    """Triton block-sparse at random kv-head plans (128-token blocks) against the fastest dense:
    per-pair throughput = (dense ms x density) / sparse ms, the share of dense's speed kept."""
    rows = []
    for D in HEAD_DIMS:
        for N in ARGS.sparse_lengths:
            q, k, v = qkv(N, 1, D)
            best, dense, _ = fastest_dense(q, k, v)
            for d in (0.25, 0.1, 0.05):
                plan = random_plan(B, HKV, N, N, 128, d, seed=3)
                ms = cuda_time(lambda plan=plan: ops.block_sparse(q, k, v, plan, backend="triton"), ARGS.reps)
                dens = plan.density()
                row = {"N": N, "D": D, "target_density": d, "density": dens, "dense": best, "dense_ms": dense,
                       "dense_tflops": causal_tflops(N, D, dense), "triton_ms": ms,
                       "triton_tflops": causal_tflops(N, D, ms, dens), "speedup": dense / ms,
                       "per_pair": dense * dens / ms, "goal_per_pair": 0.75 if d >= 0.1 else 0.60}
                rows.append(row)
                log(f"  N={N} D={D} d={d}: {ms:.2f} ms, {row['speedup']:.2f}x {best}, "
                    f"per pair {row['per_pair']:.0%}, {row['triton_tflops']:.0f} TFLOP/s")
    return rows


def xattention_estimation() -> list:
    """The XAttention selector's whole call (scores, selection on device) as a share of the fastest
    dense, stride 8 and 16, 128-token blocks (the authors: 12.6 % and 4.9 % at 128K)."""
    from attnzoo.selectors.xattention import XAttention
    rows = []
    for N in [n for n in ARGS.lengths if n >= 32768]:
        q, k, v = qkv(N, 2)
        best, dense, _ = fastest_dense(q, k, v)
        for stride in (8, 16):
            sel = XAttention(threshold=0.9, stride=stride, block_size=128, chunk_size=16384)
            with torch.no_grad():
                scores = cuda_time(lambda: [w for _, _, w in antidiagonal_block_scores(
                    q, k, stride=stride, block_size=128, chunk_size=16384, backend="triton")], max(5, ARGS.reps // 2))
                full = cuda_time(lambda sel=sel: sel(q, k), max(5, ARGS.reps // 2))
            goal = 0.10 if stride == 8 else 0.05
            rows.append({"N": N, "stride": stride, "dense": best, "dense_ms": dense,
                         "dense_tflops": causal_tflops(N, 128, dense), "scores_ms": scores, "estimate_ms": full,
                         "scores_share": scores / dense, "estimate_share": full / dense,
                         "goal_share": goal if N >= 131072 else None})
            log(f"  N={N} stride {stride}: {rows[-1]}")
    return rows


def mixed_vs_split() -> list:
    """A half-FA / half-XA layer: one mixed launch against per-mode launches (FA heads through the
    fastest dense kernel, XA heads through Triton block-sparse) and against dense on all heads."""
    N = ARGS.sparse_len
    q, k, v = qkv(N, 4)
    xa = random_plan(B, HQ, N, N, 128, 0.1, seed=5)
    half = torch.arange(HQ, device="cuda") >= HQ // 2  # first half FA, second half XA
    mode = torch.where(half, 2, 0).int()[None].contiguous()
    mplan = MixedPlan(mode, torch.zeros_like(mode), torch.zeros_like(mode), xa, 128, N, N)
    one = cuda_time(lambda: ops.mixed(q, k, v, mplan, backend="triton"), ARGS.reps)
    h2 = HKV // 2
    xa_half = BlockPlan(xa.kv_indices[:, HQ // 2:], xa.kv_counts[:, HQ // 2:], 128, 128, N, N)
    best, dense_all, _ = fastest_dense(q, k, v)
    fa = dense_candidates()[best]

    def split():
        o1 = fa(q[:, : HQ // 2], k[:, :h2], v[:, :h2])
        o2 = ops.block_sparse(q[:, HQ // 2:], k[:, h2:], v[:, h2:], xa_half, backend="triton")
        return torch.cat([o1, o2], 1)
    two = cuda_time(split, ARGS.reps)
    chosen = min(one, two)  # the routed executor times both per layer and runs the faster
    row = {"N": N, "xa_density": xa.density(), "single_launch_ms": one, "per_mode_launches_ms": two,
           "single_vs_per_mode": two / one, "dense": best, "dense_all_heads_ms": dense_all,
           "dense_tflops": causal_tflops(N, 128, dense_all), "single_launch_vs_dense": dense_all / one,
           "per_mode_vs_dense": dense_all / two, "chosen_vs_dense": dense_all / chosen}
    log(f"  {row}")
    return [row]


def router_latency() -> list:
    from attnzoo.routers.elastic import ElasticRouter
    router = ElasticRouter(head_dim=128)
    rows = []
    for N in (32768, 131072):
        keys = torch.randn(B, N, HKV, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            router.logits(keys, 0)  # moves the layer to the device once, as in a prefill
            t = cuda_time(lambda: router.logits(keys, 0), 100, warmup=10)
            gpu = gpu_time(lambda: router.logits(keys, 0), 100)
        rows.append({"N": N, "router_ms": gpu, "call_latency_ms": t, "goal_ms": 0.05})
        log(f"  {rows[-1]}")
    return rows


def end_to_end() -> list:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, num_hidden_layers=ARGS.e2e_layers, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    half = ["fa"] * (HKV // 2) + ["sa"] * (HKV // 2)
    xa = {"selector": {"name": "xattention", "threshold": 0.9, "stride": 8, "block_size": 128,
                       "chunk_size": 16384}, "op": "block_sparse"}
    st = {"selector": {"name": "streaming", "sink": 128, "local": 1024, "block_size": 128}, "op": "block_sparse"}
    table = {"name": "table", "heads": {i: half for i in range(cfg.num_hidden_layers)}, "labels": None}
    table.pop("labels")
    presets = {
        "full": {"default": {"op": "dense"}},
        "xattention": {"default": xa},
        "fa-xa (half heads each)": {"default": {"router": dict(table), "branches": {"fa": {"op": "dense"}, "sa": xa}}},
        "xa-streaming (half heads each)": {"default": {"router": dict(table), "branches": {"fa": xa, "sa": st}}},
    }
    rows = []
    for N in ARGS.e2e_lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, N), device="cuda")
        times = {}
        for name, stack in presets.items():
            if time.time() - T0 > ARGS.budget - 20:
                RESULTS["skipped"].append(f"e2e {name} N={N} (budget)")
                continue
            with torch.no_grad(), patch(model, build(stack)):
                fwd = lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False)
                times[name] = cuda_time(fwd, ARGS.e2e_reps, warmup=1)
            log(f"  N={N} {name}: {times[name]:.1f} ms")
        row = {"N": N, "layers": cfg.num_hidden_layers, **{f"{k}_ms": t for k, t in times.items()}}
        if "full" in times:
            for k, t in times.items():
                row[f"{k}_speedup"] = times["full"] / t
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


# -- report --------------------------------------------------------------------------------------

def header() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2 ** 30, 1),
            "cuda": torch.version.cuda, "torch": torch.__version__, "triton": installed_version("triton"),
            "flashinfer": installed_version("flashinfer-python"), "python": platform.python_version(),
            "flashinfer_backend": settings.get("flashinfer_backend"),
            "command": " ".join(sys.argv)}


def markdown() -> str:
    h = RESULTS.get("machine", {})
    out = ["# attnzoo GPU run", "",
           " | ".join(f"{k}: {v}" for k, v in h.items() if k != "command"), "",
           f"command: `{h.get('command', '')}`", ""]
    s = RESULTS["sections"]
    if "correctness" in s:
        out += ["## Correctness (bf16, vs fp32 reference; rel err = max|x-ref|/max|ref|)", "",
                "| case | backend | out | lse | grad | ok |", "|---|---|---|---|---|---|"]
        f = lambda x: "-" if x is None else f"{x:.1e}"
        for r in s["correctness"]:
            out.append(f"| {r['case']} | {r['backend']} | {f(r.get('out'))} | {f(r.get('lse'))} | "
                       f"{f(r.get('grad'))} | {'yes' if r['ok'] else 'NO ' + r.get('error', '')} |")
        out.append("")
    goals = ["## Dense attention (B=1, Hq=32, Hkv=8, bf16, causal): ms (TFLOP/s); the fastest is every "
             "ratio's baseline", ""]
    dense_rows = s.get("dense_backends", [])
    if dense_rows:
        names = list(dense_rows[0]["ms"])
        goals += ["| N | D | " + " | ".join(names) + " | fastest |", "|---|---|" + "---|" * (len(names) + 1)]
        for r in dense_rows:
            cells = [f"{r['ms'][n]:.2f} ({r['tflops'][n]:.0f})" if n in r["ms"] else "-" for n in names]
            goals.append(f"| {r['N']} | {r['D']} | " + " | ".join(cells) + f" | {r['fastest']} |")
        goals.append("")
    goals += ["## Ratios against goals (B=1, Hq=32, Hkv=8, bf16, causal)", "",
              "| measurement | value | goal | met |", "|---|---|---|---|"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    for r in s.get("block_sparse", []):
        goals.append(f"| Triton block-sparse per-pair throughput, N={r['N']}, D={r['D']}, "
                     f"density {r['density']:.3f} "
                     f"({r['triton_ms']:.2f} ms = {r['triton_tflops']:.0f} TFLOP/s; "
                     f"{r['dense']} {r['dense_ms']:.2f} ms = "
                     f"{r['dense_tflops']:.0f} TFLOP/s; {r['speedup']:.2f}x) | {r['per_pair']:.0%} | "
                     f">= {r['goal_per_pair']:.0%} | {yes(r['per_pair'] >= r['goal_per_pair'])} |")
    for r in s.get("xattention_estimation", []):
        g = r["goal_share"]
        goals.append(f"| XAttention estimate / {r['dense']}, N={r['N']}, stride {r['stride']} "
                     f"({r['estimate_ms']:.2f} / {r['dense_ms']:.2f} ms; scores kernel alone "
                     f"{r['scores_share']:.1%}) | {r['estimate_share']:.1%} | "
                     f"{f'<= {g:.0%}' if g else 'report'} | {yes(r['estimate_share'] <= g) if g else '-'} |")
    for r in s.get("mixed", []):
        goals.append(f"| half FA / half XA (density {r['xa_density']:.2f}), N={r['N']}: one mixed launch vs per-mode "
                     f"launches ({r['single_launch_ms']:.1f} vs {r['per_mode_launches_ms']:.1f} ms) | "
                     f"{r['single_vs_per_mode']:.2f}x | report | - |")
        goals.append(f"| half FA / half XA, the faster of the two vs {r['dense']} on all heads "
                     f"({r['dense_all_heads_ms']:.1f} ms = {r['dense_tflops']:.0f} TFLOP/s) | "
                     f"{r['chosen_vs_dense']:.2f}x | "
                     f">= 1.6x | {yes(r['chosen_vs_dense'] >= 1.6)} |")
    for r in s.get("router", []):
        goals.append(f"| Elastic router forward (pool + MLPs, one layer, all KV heads; GPU time, queued; "
                     f"call latency {r.get('call_latency_ms', float('nan')):.3f} ms), N={r['N']} | "
                     f"{r['router_ms']:.3f} ms | <= 0.05 ms | {yes(r['router_ms'] <= 0.05)} |")
    e2e_goals = {"xa-streaming (half heads each)": (3.5, 131072), "fa-xa (half heads each)": (1.6, None)}
    for r in s.get("end_to_end", []):
        for name in ("xattention", "fa-xa (half heads each)", "xa-streaming (half heads each)"):
            key = f"{name}_speedup"
            if key not in r:
                continue
            goal, at = e2e_goals.get(name, (None, None))
            applies = goal is not None and (at is None or at == r["N"])
            goals.append(f"| prefill {name} vs full, {r['layers']}-layer Llama-3.1-8B shape, N={r['N']} "
                         f"({r[name + '_ms']:.0f} vs {r['full_ms']:.0f} ms) | {r[key]:.2f}x | "
                         f"{f'>= {goal}x' if applies else 'report'} | "
                         f"{('yes' if r[key] >= goal else 'no') if applies else '-'} |")
    out += goals + [""]
    if RESULTS["skipped"]:
        out += ["Skipped (time budget): " + "; ".join(RESULTS["skipped"]), ""]
    if RESULTS["errors"]:
        out += ["Errors: " + "; ".join(f"{k}: {v}" for k, v in RESULTS["errors"].items()), ""]
    return "\n".join(out)


def save() -> None:
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    RESULTS["elapsed_s"] = round(time.time() - T0, 1)
    (out / "gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    (out / "gpu.md").write_text(markdown())


def use_swept_scores_config(path: Path) -> None:
    """Swap ``triton_scores.launch_config`` for a sweep's best configs (per stride, at the sweep's
    head dim; query tiles kept at the same number of reduced rows); recorded in the results."""
    from attnzoo.ops.kernels import triton_scores as ts

    tune = json.loads(path.read_text())
    best = {int(name.rsplit("_s", 1)[1]): r["best"]["config"] for name, r in tune.items()
            if name.startswith("xattention_scores_s") and r.get("best")}
    shipped, dim, block = ts.launch_config, tune["dim"], tune.get("xa_block", 128)

    def config(R, D, S):
        if D != dim or S not in best:
            return shipped(R, D, S)
        cfg = dict(best[S])
        cfg["QB"] = max(1, cfg["QB"] * (block // S) // R)
        return cfg
    ts.launch_config = config
    RESULTS["scores_config"] = {"from": str(path), "dim": dim, "configs": best}
    log(f"XAttention scoring configs from {path}: {best}")


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu")
    p.add_argument("--budget", type=float, default=540.0, help="seconds; later sections are skipped past it")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--sparse-len", type=int, default=65536, help="the mixed section's length")
    p.add_argument("--sparse-lengths", type=int, nargs="+", default=[65536, 131072])
    p.add_argument("--e2e-lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--e2e-layers", type=int, default=4)
    p.add_argument("--e2e-reps", type=int, default=3)
    p.add_argument("--scores-config", type=Path, default=None,
                   help="a bench/gpu/tune.py tune.json: its best XAttention scoring config per stride replaces the "
                        "shipped launch_config at that head dim (to measure a sweep's winner in the same call)")
    p.add_argument("--sections", nargs="+", default=["correctness", "dense_backends", "block_sparse",
                                                        "xattention_estimation", "mixed", "router", "end_to_end"])
    ARGS = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    os.environ.setdefault("ATTNZOO_CHECK_FINITE", "0")  # a NaN scan is a device sync per call
    RESULTS["machine"] = header()
    if ARGS.scores_config:
        use_swept_scores_config(ARGS.scores_config)
    log(json.dumps(RESULTS["machine"]))
    table = {
        "correctness": section("correctness", 30)(correctness),
        "dense_backends": section("dense_backends", 30)(dense_backends),
        "block_sparse": section("block_sparse", 30)(block_sparse_sweep),
        "xattention_estimation": section("xattention_estimation", 20)(xattention_estimation),
        "mixed": section("mixed", 15)(mixed_vs_split),
        "router": section("router", 5)(router_latency),
        "end_to_end": section("end_to_end", 60)(end_to_end),
    }
    for name in ARGS.sections:
        table[name]()
    save()
    log("done")
    print(markdown())
    return 0 if not RESULTS["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
