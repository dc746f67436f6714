"""Tensor-parallel sparse prefill (issue 15's run): one process per GPU, heads sharded by
transformers' ``tp_plan="auto"``, every preset patched with ``attnzoo.patch``.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node N bench/gpu/tp_prefill.py --check --out DIR   # correctness
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node N bench/gpu/tp_prefill.py --out DIR           # speed
    torchrun --nproc-per-node 2 bench/gpu/tp_prefill.py --smoke --out /tmp/tp   # CPU, gloo, tiny shapes

Run it once per TP degree (1, 2, 4, 8); each run writes ``tp{N}.json``, and ``--report DIR`` merges
them into ``tp.md`` with scaling efficiency (TP-1 time / (N x TP-N time)). The model is
Llama-3.1-8B-shaped (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336) with random bf16
weights and ``--layers`` layers (default 8: the checkpoint every rank loads stays ~4 GB; per-layer
cost is what scales). Random weights make attention near uniform, so only fixed-density presets are
timed: full, streaming, topk-blocks and a half-dense / half-streaming table-routed stack.
Prefill is timed with CUDA events after a warm-up (median of ``--reps``); the communication share
is the NCCL kernels' time over all kernels' in one profiled prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attnzoo  # noqa: E402
from attnzoo.integrations.hf import tensor_parallel_rank  # noqa: E402

HALF = {"name": "half-dense-half-streaming", "default": {
    "router": {"name": "table", "heads": {}, "default": "full"},
    "branches": {"full": {"op": "dense"},
                 "sparse": {"selector": {"name": "streaming", "sink": 128, "local": 1024, "block_size": 64},
                            "op": "block_sparse"}}}}


def stacks(num_layers: int, kv_heads: int) -> dict:
    half = json.loads(json.dumps(HALF))
    row = ["full", "sparse"] * (kv_heads // 2)  # alternating: every TP degree gets both kinds
    half["default"]["router"]["heads"] = {i: row for i in range(num_layers)}
    return {"full": "preset:full", "streaming": "preset:streaming", "topk-blocks": "preset:topk-blocks",
            "half-dense-half-streaming": half}


def build_checkpoint(layers: int, smoke: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    where = [None]
    if dist.get_rank() == 0:
        where[0] = tempfile.mkdtemp(prefix="attnzoo-tp-bench-")
        shape = (dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8,
                      vocab_size=256) if smoke else
                 dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256))
        cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=131072, rope_theta=500000.0, **shape)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.float32 if smoke else torch.bfloat16).save_pretrained(where[0])
    dist.broadcast_object_list(where, src=0)
    return where[0]


def check_stacks() -> dict:
    """Issue 15's correctness set at GPU-sized blocks (the CPU test uses tiny ones)."""
    sparse = {"selector": {"name": "streaming", "sink": 64, "local": 256, "block_size": 64}, "op": "block_sparse"}
    return {
        "full": "preset:full",
        "streaming": {"name": "streaming", "default": sparse},
        "xattention": {"name": "xattention", "default": {
            "selector": {"name": "xattention", "threshold": 0.9, "stride": 8, "block_size": 64}, "op": "block_sparse"}},
        "table": {"name": "table", "default": {
            "router": {"name": "table", "heads": {}, "default": "full"}, "branches": {"full": {"op": "dense"},
                                                                                      "sparse": sparse}}},
        "elastic": {"name": "elastic", "default": {
            "router": {"name": "elastic", "head_dim": 128, "pool_tokens": 100, "seed": 3},
            "branches": {"full": {"op": "dense"}, "sparse": sparse}}},
    }


def check(args) -> None:
    """Greedy tokens and logits of each stack: the TP model against a whole copy on this rank's
    GPU (a random Llama with 8 KV heads, 2 layers)."""
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    path = build_checkpoint(2, smoke=True)  # the small shape: 8 query and 8 KV heads
    dt = torch.float32
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=dt).eval().to("cuda" if cuda else "cpu")
    tp_model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, tp_plan="auto").eval()
    rank, tp = tensor_parallel_rank(tp_model)
    ids = torch.randint(0, 256, (1, 1000), generator=torch.Generator().manual_seed(0)).to(whole.device)
    stacks_ = check_stacks()
    stacks_["table"]["default"]["router"]["heads"] = {i: ["full", "sparse"] * 4 for i in range(2)}
    res = {}
    for name, spec in stacks_.items():
        with torch.no_grad():
            with attnzoo.patch(whole, spec):
                ref = whole(ids).logits
                ref_tokens = whole.generate(ids, max_new_tokens=8, do_sample=False)
            with attnzoo.patch(tp_model, spec):
                got = tp_model(ids).logits
                tp_tokens = tp_model.generate(ids, max_new_tokens=8, do_sample=False)
        res[name] = {"max_logit_error": float((got.float() - ref.float()).abs().max()),
                     "same_greedy_tokens": bool(torch.equal(ref_tokens, tp_tokens))}
        if rank == 0:
            print(f"tp {tp} check {name}: {res[name]}", flush=True)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"check-tp{tp}.json").write_text(json.dumps({"tp": tp, "machine": machine(cuda, tp), **res}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def timed(fn, cuda: bool, reps: int) -> float:
    fn()  # warm-up: Triton JIT, routed-path measurement
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def comm_share(fn) -> float | None:
    if not torch.cuda.is_available():
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages())
    nccl = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return nccl / total if total else None


def run(args) -> None:
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    path = build_checkpoint(args.layers, args.smoke)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if args.smoke else torch.bfloat16,
                                                 tp_plan="auto").eval()
    rank, tp = tensor_parallel_rank(model)
    device = next(model.parameters()).device
    lengths = [256, 512] if args.smoke else args.lengths
    results = {"tp": tp, "layers": args.layers, "lengths": lengths, "smoke": args.smoke, "presets": {}}
    for name, spec in stacks(args.layers, model.config.num_key_value_heads).items():
        results["presets"][name] = {}
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            ids = ids.to(device)
            with torch.no_grad(), attnzoo.patch(model, spec):
                prefill = lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
                ms = timed(prefill, cuda, args.reps)
                share = comm_share(prefill) if cuda else None
            results["presets"][name][str(n)] = {"prefill_ms": ms, "comm_share": share}
            if rank == 0:
                print(f"tp {tp} {name} {n}: {ms:.1f} ms" + (f", NCCL {share:.0%}" if share is not None else ""),
                      flush=True)
    if rank == 0:
        results["machine"] = machine(cuda, tp)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"tp{tp}.json").write_text(json.dumps(results, indent=1))
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


def machine(cuda: bool, tp: int) -> dict:
    import transformers
    import triton

    m = {"gpus": tp, "torch": torch.__version__, "triton": triton.__version__,
         "transformers": transformers.__version__, "python": platform.python_version(),
         "nccl_nvls": os.environ.get("NCCL_NVLS_ENABLE", "unset")}
    if cuda:
        m |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
              "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    return m


def report(folder: Path) -> str:
    """Merge tp*.json into tp.md: prefill ms, speed-up over TP 1 and scaling efficiency."""
    runs = {json.loads(p.read_text())["tp"]: json.loads(p.read_text()) for p in sorted(folder.glob("tp*.json"))}
    if not runs:
        raise SystemExit(f"no tp*.json in {folder}")
    base = runs.get(1)
    any_run = next(iter(runs.values()))
    shape = ("a tiny fp32 smoke model on CPU/gloo: not a measurement" if any_run.get("smoke") else
             f"{any_run['layers']} Llama-3.1-8B-shaped layers, bf16, random weights")
    lines = [f"# Tensor-parallel prefill ({shape})",
             "", "machine: " + " | ".join(f"{k}: {v}" for k, v in runs[max(runs)]["machine"].items()), "",
             "| preset | tokens | " + " | ".join(f"TP {t} ms (eff., NCCL)" for t in sorted(runs)) + " |",
             "|---|---|" + "---|" * len(runs)]
    for name in any_run["presets"]:
        for n in any_run["lengths"]:
            cells = []
            for t in sorted(runs):
                r = runs[t]["presets"][name][str(n)]
                one = None if base is None else base["presets"][name][str(n)]["prefill_ms"]
                eff = "" if one is None else f", {one / (t * r['prefill_ms']):.0%}"
                share = "" if r["comm_share"] is None else f", {r['comm_share']:.0%}"
                cells.append(f"{r['prefill_ms']:.1f}{eff}{share}")
            lines.append(f"| {name} | {n:,} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (folder / "tp.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/gpu-tp")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, a tiny model: checks the script")
    p.add_argument("--report", type=Path, help="merge a folder's tp*.json into tp.md and exit")
    p.add_argument("--check", action="store_true", help="correctness: TP vs one whole copy, greedy tokens")
    args = p.parse_args()
    if args.report:
        print(report(args.report))
        return
    check(args) if args.check else run(args)


if __name__ == "__main__":
    main()
