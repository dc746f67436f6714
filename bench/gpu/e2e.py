"""End to end on the real embedded model: every shipped preset against full attention, one process.

    python3 bench/gpu/e2e.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR \\
        [--lengths 8192 16384 32768 65536] [--presets full streaming ...] [--reps 5]

The embedded SmolLM2-135M (bf16) prefills a real-text prompt (CPython's documentation, the NIAH
haystack) of each length; past its 8K context it is extended with YaRN (the smallest power-of-two
factor, ``attnzoo.models.extend_context``). For each length the presets are interleaved (every
repeat runs every preset, in a rotated order), so a change in the machine's load cannot become a
ratio. Reported per preset: prefill ms (median of ``--reps``, ``torch.cuda.synchronize`` around
``model(ids, logits_to_keep=1)``), its spread, the ratio to ``full`` (PyTorch's default SDPA: the
fastest dense attention on Hopper) measured in the same process, mean attention density, kernel
launches and host syncs per prefill (``torch.profiler``: CUDA kernels, and CUDA synchronisation
calls plus ``aten::_local_scalar_dense``), and the kernels one attention call of a middle layer
launches (selection plus attention). Writes ``DIR/e2e.json`` after every length and ``DIR/e2e.md``.
``--device cpu`` runs the same script on a CPU at small lengths (a smoke test of the script).

``--geometry llama-3.1-8b --layers 4`` runs a random-weight Llama instead, with Llama-3.1-8B's
attention geometry (32 query / 8 KV heads, head dim 128, hidden 4096, MLP 14336, RoPE theta 500K,
131,072 positions) and a few of its layers, on random token ids: the shapes users run. Random
weights make attention near-uniform, so threshold methods (XAttention, Token Sparse) keep more
blocks than on a trained model; only presets that fit any model run there (the calibrated ones,
the table and the Elastic routers were made for SmolLM2).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# this folder holds profile.py, which would shadow the standard library's profile module
sys.path[:] = [x for x in sys.path if Path(x or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnzoo  # noqa: E402
from attnzoo import settings  # noqa: E402
from attnzoo.cli import installed_version  # noqa: E402
from attnzoo.config import load_config, preset_names, preset_spec, without_dense_below  # noqa: E402
from attnzoo.models import extend_context  # noqa: E402
from attnzoo.stack import CallContext, DensityMeter  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def load(gguf: Path, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # named by the file, not its folder: presets fitted to a model (weights: auto routers, fitted_for)
    # recognise it by name (from /tmp, elastic-fa-xa's router was not found and the preset left out)
    model.name_or_path = model.config._name_or_path = str(gguf)
    return model.to(device).eval(), tok


GEOMETRIES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072),
}


def load_random(geometry: str, layers: int, device: str):
    """A random-weight Llama with ``geometry``'s attention shapes and ``layers`` layers (bf16 on CUDA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, **GEOMETRIES[geometry])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.name_or_path = f"random-{geometry}-{layers}-layers"
    return model.eval(), None


def prompt_ids(tok, length: int, seed: int = 0) -> torch.Tensor:
    """``length`` tokens of real text: a NIAH prompt, padded out with more documentation text if the
    haystack slice is short (speed is measured here, not retrieval)."""
    from attnzoo.eval.niah import haystack_text, make_prompt

    if tok is None:  # a random-weight model: random token ids
        return torch.randint(1, 32000, (1, length), generator=torch.Generator().manual_seed(length + 7919 * seed))
    ids = make_prompt(tok, "single", length, 0.5, seed=seed).input_ids
    if ids.shape[1] < length:
        more = tok(haystack_text() * 2, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([more[:, : length - ids.shape[1]], ids], 1)
    return ids[:, -length:]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids):
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


@torch.no_grad()
def timed(model, ids, device) -> float:
    sync(device)
    t = time.perf_counter()
    prefill(model, ids)
    sync(device)
    return (time.perf_counter() - t) * 1e3


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def profile_counts(fn, device, top: int = 0) -> dict:
    """Kernels launched and host syncs in one call of ``fn`` (torch.profiler); with ``top``, also the
    wall time, the summed kernel time and the ``top`` ops by device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = (time.perf_counter() - t) * 1e3
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset")))
    launches = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                   "cuLaunchKernelEx"))
    syncs = {name: sum(1 for e in events if e.name == name) for name in SYNC_CALLS}
    out = {"kernels": kernels, "launch_calls": launches, "syncs": sum(syncs.values()),
           "sync_detail": {k: v for k, v in syncs.items() if v}}
    if top:
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        out["wall_ms_profiled"] = wall
        out["kernel_ms"] = sum(e.device_time for e in gpu) / 1e3
        by = {}
        for e in gpu:
            name = e.name.split("<")[0].split("(")[0][-60:]
            by[name] = by.get(name, 0.0) + e.device_time / 1e3
        out["top_kernels_ms"] = dict(sorted(by.items(), key=lambda x: -x[1])[:top])
    return out


def attention_call_counts(model, ids, stack, layer: int, device) -> dict:
    """Kernels of one attention call (selection + attention) of ``layer``, on that layer's q/k/v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attnzoo.integrations.hf import pre_rope_key_hooks, use_attention

    captured = {}

    def grab(module, query, key, value, attention_mask, **kw):
        if module.layer_idx == layer:
            captured["qkv"] = (query, key, value, kw.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    with pre_rope_key_hooks(model) as keys, use_attention(model, grab, prefix="attnzoo_grab"), torch.no_grad():
        prefill(model, ids)
    q, k, v, scale = captured["qkv"]
    ctx = lambda: CallContext(layer_idx=layer, scale=scale, pre_rope_keys=keys.get(layer), cache={})  # noqa: E731
    with torch.no_grad():
        stack(layer, q, k, v, ctx())  # warm: compiles, per-shape caches
        counts = profile_counts(lambda: stack(layer, q, k, v, ctx()), device, top=8)
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            stack(layer, q, k, v, ctx())
        sync(device)
        counts["call_ms"] = (time.perf_counter() - t) * 1e2  # mean of 10 back-to-back calls
        return counts


NO_ATTENTION = "(no attention)"


def graph_states(stack) -> dict:
    """How many layer-call signatures replay a graph, and why the others run eagerly."""
    out: dict = {}
    for e in stack.graphs.report():
        out[e["state"]] = out.get(e["state"], 0) + 1
    return out


@contextlib.contextmanager
def without_attention(model):
    """Every attention call returns zeros of its output's shape: the prefill's other work, timed to
    give each preset its ceiling (``ceiling``)."""
    from attnzoo.integrations.hf import use_attention

    def zeros(module, query, key, value, attention_mask, **kw):
        B, H, N, D = query.shape
        return query.new_zeros(B, N, H, D), None

    with use_attention(model, zeros, prefix="attnzoo_none"):
        yield


def ceiling(full_ms: float, rest_ms: float, density: float) -> float:
    """The ratio a preset at ``density`` would reach if its attention cost exactly its density's
    share of dense attention and nothing else: full / (rest + density x (full - rest))."""
    return full_ms / (rest_ms + density * max(full_ms - rest_ms, 0.0))


def sync_debug_violations(model, ids, device) -> int | None:
    """Host syncs reported by ``torch.cuda.set_sync_debug_mode('warn')`` during one prefill."""
    if device != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill(model, ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def routed_paths(stack, num_layers: int, length: int) -> dict:
    """How many layers' routed nodes chose the mixed launch or the split path at this length."""
    from attnzoo.stack import Routed

    seen, todo, out = set(), [stack.node_for(i) for i in range(num_layers)], {}
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(node.children())
        if isinstance(node, Routed):
            for path, n in node.path_choices().get(Routed.length_bucket(length), {}).items():
                out[path] = out.get(path, 0) + n
    return out


def preset_stacks(presets: list[str], sparse_everywhere: bool = False, shipped: bool = True) -> dict:
    """Label -> stack config for shipped preset names or stack YAML paths (labelled by the stack's
    name). With ``sparse_everywhere``, each preset with a ``dense_below`` switch also gets a row
    "NAME (sparse everywhere)" without it (and only that row without ``shipped``)."""
    out = {}
    for p in presets:
        spec = load_config(preset_spec(p))
        if shipped or not sparse_everywhere or without_dense_below(spec) == spec:
            out[spec.get("name", p)] = spec
        if sparse_everywhere and without_dense_below(spec) != spec:
            out[f"{spec.get('name', p)} (sparse everywhere)"] = without_dense_below(spec)
    return out


def run_length(model, tok, length: int, specs: dict, reps: int, device: str, distinct: int = 1) -> dict:
    factor = extend_context(model, length)
    ids = prompt_ids(tok, length).to(device)
    # repeat r times prompt r % distinct (every preset the same one in a round): with distinct > 1 a
    # path whose shapes depend on the prompt (Token Sparse's kept width) pays its per-shape setup
    # (cuDNN plans, graph captures) as a server would, instead of once in the warm-up
    prompts = [ids] + [prompt_ids(tok, length, seed=i).to(device) for i in range(1, distinct)]
    stacks = {p: attnzoo.build(spec).for_model(model) for p, spec in specs.items()}
    presets = list(specs)
    layer = model.config.num_hidden_layers // 2
    rows = {p: {"times": []} for p in presets}
    for p in presets:  # warm-up: Triton compiles, per-shape caches; density and counts on the side
        meter = DensityMeter()
        with attnzoo.patch(model, stacks[p], meter=meter):
            prefill(model, ids)
            rows[p]["density"] = meter.mean()
        with attnzoo.patch(model, stacks[p]):  # counted without the density meter's own work
            if settings.get("cuda_graphs"):  # first call eager, second captures: count the replays
                prefill(model, ids)
                prefill(model, ids)
                rows[p]["graphs"] = graph_states(stacks[p])
            rows[p]["prefill_counts"] = profile_counts(lambda: prefill(model, ids), device)  # noqa: B023
            rows[p]["sync_debug_warnings"] = sync_debug_violations(model, ids, device)
        rows[p]["attention_call"] = attention_call_counts(model, ids, stacks[p], layer, device)
        paths = routed_paths(stacks[p], model.config.num_hidden_layers, length)
        if paths:
            rows[p]["routed_paths"] = paths
            log(f"  {length} {p}: routed layers chose {paths}")
        if rows[p].get("graphs"):
            log(f"  {length} {p}: graphs {rows[p]['graphs']}")
        log(f"  {length} {p}: density {rows[p]['density']:.3f}, {rows[p]['prefill_counts']['kernels']} kernels, "
            f"{rows[p]['prefill_counts']['syncs']} syncs per prefill; layer {layer}: "
            f"{rows[p]['attention_call']['kernels']} kernels, {rows[p]['attention_call']['syncs']} syncs, "
            f"{rows[p]['attention_call']['call_ms']:.3f} ms per call, kernels "
            f"{rows[p]['attention_call'].get('kernel_ms', 0):.3f} ms: "
            f"{rows[p]['attention_call'].get('top_kernels_ms')}")
    # short prefills are host-bound and noisy (the same work varied 33-62 ms at 8K): more repeats,
    # and no garbage collection inside the timed loop
    reps = reps * max(1, 32768 // length)
    gc.collect()
    gc.disable()
    rows[NO_ATTENTION] = {"times": []}
    labels = presets + [NO_ATTENTION]
    try:
        for r in range(reps):
            order = labels[r % len(labels):] + labels[: r % len(labels)]  # rotated every repeat
            for p in order:
                with without_attention(model) if p == NO_ATTENTION else attnzoo.patch(model, stacks[p]):
                    rows[p]["times"].append(timed(model, prompts[r % distinct], device))
    finally:
        gc.enable()
    full = statistics.median(rows["full"]["times"]) if "full" in rows else None
    rest_ms = statistics.median(rows.pop(NO_ATTENTION)["times"])
    for row in rows.values():
        row["ms"] = statistics.median(row["times"])
        if full is not None:
            ratios = sorted(f / t for f, t in zip(rows["full"]["times"], row["times"], strict=True))
            row["ratio"] = full / row["ms"]
            row["ratio_range"] = [ratios[0], ratios[-1]]  # per-repeat ratios (same round)
            row["ceiling"] = ceiling(full, rest_ms, row["density"])
            row["attention_only_ratio"] = rows["full"]["attention_call"]["call_ms"] / row["attention_call"]["call_ms"]
    log(f"== {length}: " + ", ".join(f"{p} {row['ms']:.1f} ms ({row.get('ratio', 0):.2f}x)" for p, row in rows.items()))
    cfg = model.config
    return {"length": length, "tokens": int(ids.shape[1]), "yarn_factor": factor, "layer_profiled": layer,
            "distinct_prompts": distinct,
            "non_attention_ms": rest_ms, "q_heads": cfg.num_attention_heads, "head_dim": getattr(cfg, "head_dim", None)
            or cfg.hidden_size // cfg.num_attention_heads, "presets": rows}


def dense_tflops(run: dict) -> float | None:
    """Achieved TFLOP/s of the baseline's attention kernels in the profiled layer call (causal:
    4 * Hq * D flops per visible query-key pair)."""
    full = run["presets"].get("full", {}).get("attention_call", {})
    if not full.get("kernel_ms") or not run.get("q_heads"):
        return None
    n = run["tokens"]
    flops = 4 * run["q_heads"] * run["head_dim"] * n * (n + 1) / 2
    return flops / (full["kernel_ms"] * 1e-3) / 1e12


def header(device) -> dict:
    h = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": installed_version("transformers"), "triton": installed_version("triton"),
         "attnzoo": attnzoo.__version__}
    if device == "cuda":
        h["gpu"] = torch.cuda.get_device_name()
        h["cuda"] = torch.version.cuda
    return h


def markdown(result: dict) -> str:
    h = result["machine"]
    title = (f"# End to end: {result.get('model', 'the embedded SmolLM2-135M')} prefill, every preset that fits it "
             f"vs full ({h.get('gpu', 'CPU')})")
    lines = [title, "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in h.items()), "",
             f"Command: `{result['command']}`", "",
             *(["Every layer call (full's too) replays a CUDA graph where it can (`attnzoo.stack.graphs`; "
                "*graphs* says how many signatures replay and why others run eagerly).", ""]
               if result.get("cuda_graphs") else []),
             "Ratio = full's median prefill / the preset's, both measured in this process with presets interleaved; "
             "the range is the lowest and highest per-repeat ratio. `full` is PyTorch's default SDPA. Kernels, syncs "
             "are per prefill (torch.profiler); *layer call* is one attention call of the middle layer "
             "(selection + attention); *attention only* is full's layer call over the preset's. *Ceiling*: the "
             "ratio at the preset's density if its attention cost only that share of dense attention: full / "
             "(non-attention + density x (full - non-attention)), non-attention = the prefill with attention "
             "returning zeros, timed in the same interleaved rounds.", ""]
    for run in result["runs"]:
        tflops = dense_tflops(run)
        lines += [f"## {run['length']:,} tokens (YaRN x{run['yarn_factor']})" if run["yarn_factor"] > 1
                  else f"## {run['length']:,} tokens (native context)", ""]
        if tflops is not None:
            lines += [f"Baseline attention (full, layer {run['layer_profiled']}, one call): "
                      f"{run['presets']['full']['attention_call']['kernel_ms']:.3f} ms of kernels = "
                      f"**{tflops:.0f} TFLOP/s**.", ""]
        if run.get("distinct_prompts", 1) > 1:
            lines += [f"Timed over {run['distinct_prompts']} distinct prompts of this length, in turn "
                      "(density and counts: the first).", ""]
        lines += [f"Non-attention work: {run['non_attention_ms']:.1f} ms of the prefill.", "",
                  "| preset | prefill ms | vs full | range | ceiling | of ceiling | attention only | density | "
                  "kernels / prefill | syncs / prefill | sync-debug warnings | layer call: kernels | "
                  "layer call: syncs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p, r in run["presets"].items():
            rr = r.get("ratio_range", [float("nan")] * 2)
            nan = float("nan")
            lines.append(f"| {p} | {r['ms']:.1f} | {r.get('ratio', nan):.2f}x | {rr[0]:.2f}-{rr[1]:.2f} | "
                         f"{r.get('ceiling', nan):.2f}x | {r.get('ratio', nan) / r.get('ceiling', nan):.0%} | "
                         f"{r.get('attention_only_ratio', nan):.2f}x | {r['density']:.3f} | "
                         f"{r['prefill_counts']['kernels']} | {r['prefill_counts']['syncs']} | "
                         f"{r['sync_debug_warnings']} | {r['attention_call']['kernels']} | "
                         f"{r['attention_call']['syncs']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf (or --geometry)")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), help="a random-weight model of this attention "
                   "geometry instead of the embedded model")
    p.add_argument("--layers", type=int, default=4, help="with --geometry: decoder layers")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu-e2e"))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--presets", nargs="+", default=None, help="shipped preset names or stack YAML paths "
                   "(default: every shipped preset)")
    p.add_argument("--sparse-everywhere", action="store_true", help="also run each preset that has a "
                   "dense_below switch without it (one more row per such preset)")
    p.add_argument("--sparse-only", action="store_true", help="with --sparse-everywhere: leave out the "
                   "shipped rows of presets that have a dense_below switch (they run dense below it)")
    p.add_argument("--reps", type=int, default=5, help="repeats at 32K and up; 32768 / length times more below")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graphs", action="store_true", help="replay layer calls from CUDA graphs "
                   "(attnzoo.stack.graphs), every preset and full alike")
    p.add_argument("--distinct-prompts", type=int, default=1, help="time repeat r on prompt r mod N of "
                   "the length (N > 1: shapes that depend on the prompt pay their setup as in serving)")
    args = p.parse_args(argv)
    if args.distinct_prompts < 1:
        p.error(f"--distinct-prompts must be >= 1, got {args.distinct_prompts}")
    if args.geometry is None and (args.gguf is None or not args.gguf.is_file()):
        p.error(f"--gguf {args.gguf}: no such file (or give --geometry)")
    if args.sparse_only and not args.sparse_everywhere:
        p.error("--sparse-only leaves out the shipped rows that --sparse-everywhere adds: give both")
    presets = args.presets or preset_names()
    if "full" in presets:
        presets = ["full"] + [x for x in presets if x != "full"]
    specs = preset_stacks(presets, args.sparse_everywhere, shipped=not args.sparse_only)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"loading {args.geometry or args.gguf}")
    model, tok = load_random(args.geometry, args.layers, args.device) if args.geometry else load(args.gguf, args.device)
    fits = {}
    for label, spec in specs.items():  # presets made for another model say why and are left out
        try:
            attnzoo.build(spec).for_model(model)
            fits[label] = spec
        except ValueError as e:
            log(f"  {label}: left out ({' '.join(str(e).split())[:160]})")
    specs = fits
    result = {"machine": header(args.device), "command": "python3 " + " ".join(sys.argv), "runs": [],
              "model": (f"a random-weight {args.layers}-layer model of {args.geometry}'s attention geometry"
                        if args.geometry else "the embedded SmolLM2-135M")}
    result["cuda_graphs"] = args.cuda_graphs
    for length in args.lengths:
        with settings.override(cuda_graphs=args.cuda_graphs):
            result["runs"].append(run_length(model, tok, length, specs, args.reps, args.device,
                                             args.distinct_prompts))
        (args.out / "e2e.json").write_text(json.dumps(result, indent=1))
        (args.out / "e2e.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
