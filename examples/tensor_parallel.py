"""An attention stack on a tensor-parallel model: run with

    torchrun --nproc-per-node 2 examples/tensor_parallel.py [--model DIR] [--stack PRESET_OR_YAML]

transformers shards the model by heads (``tp_plan="auto"``); ``attnzoo.patch`` gives each rank's
attention calls their slice of the global heads. Without ``--model`` a tiny random Llama (8 KV
heads) is written to a temporary folder first. Backend: NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import attnzoo
from attnzoo.stack import DensityMeter


def tiny_llama() -> str:
    """A random Llama whose 8 KV heads divide over 2, 4 or 8 ranks: rank 0 writes it to a
    temporary folder and tells the others where."""
    where = [None]
    if dist.get_rank() == 0:
        where[0] = tempfile.mkdtemp(prefix="attnzoo-tp-")
        cfg = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(where[0])
    dist.broadcast_object_list(where, src=0)
    return where[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face causal LM folder (default: a tiny random Llama)")
    p.add_argument("--stack", default="streaming", help="a preset name or stack YAML (default: streaming)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    path = args.model or tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto",
                                                 dtype=torch.bfloat16 if cuda else torch.float32).eval()
    dist.barrier()  # every rank has loaded before rank 0 removes its temporary model
    if args.model is None and rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    spec = args.stack if args.stack.endswith((".yaml", ".yml")) else f"preset:{args.stack}"
    stack = attnzoo.build(spec)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    meter = DensityMeter()
    with torch.no_grad(), attnzoo.patch(model, stack, meter=meter):
        out = model.generate(ids.to(device), max_new_tokens=8, do_sample=False)
        density = meter.mean()  # a collective: every rank reads it
    if rank == 0:
        print(stack)
        print(f"ranks {dist.get_world_size()}, prompt {args.tokens} tokens, mean attention density {density:.3f}")
        print("greedy tokens:", out[0, args.tokens:].tolist())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
