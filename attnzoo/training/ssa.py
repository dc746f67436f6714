"""SSA — Sparse Sparse Attention alignment training (arXiv 2511.20102).

Each step draws one mode for the whole forward (full or sparse, p = 0.5); every layer computes
both the full and the sparse attention output (per head, before o_proj) and only the drawn
mode's output continues in the residual stream. The alignment loss per layer is
``SmoothL1(O_full, sg(O_sparse))`` (sparsity: full imitates sparse) plus
``SmoothL1(sg(O_full), O_sparse)`` (commitment: sparse stays near full), beta = 1, averaged
over layers; total = CE(drawn mode) + alpha * alignment. Micro-batch losses are divided by the
accumulation steps as a whole, so alpha means the same for any accumulation.

Weights are trained in fp32: an SSA step (lr ~1e-5) moves a weight by far less than a bf16 ulp, so
16-bit weights would not change at all (refused with an error). On a GPU the forward runs under
bf16 autocast, so the attention kernels see bf16 as they do at inference.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .common import RunLog, layer_attention, layer_nodes, warmup_cosine

DEFAULT_SPARSE = {"default": {"selector": {"name": "topk_blocks", "block_size": 16, "top_k": 16},
                              "op": "block_sparse"}}
TRAINABLE = ("all", "attention")


def alignment_losses(o_full: torch.Tensor, o_sparse: torch.Tensor, beta: float = 1.0):
    """(sparsity, commitment): the first moves only O_full, the second only O_sparse."""
    sparsity = F.smooth_l1_loss(o_full.float(), o_sparse.detach().float(), beta=beta)
    commitment = F.smooth_l1_loss(o_full.detach().float(), o_sparse.float(), beta=beta)
    return sparsity, commitment


def set_trainable(model, which: str) -> list[torch.nn.Parameter]:
    """``all`` parameters, or ``attention`` (the attention modules' projections) only."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")
    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which == "attention":
        for mod in model.modules():
            if isinstance(getattr(mod, "layer_idx", None), int) and hasattr(mod, "q_proj"):
                for p in mod.parameters():
                    p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_ssa(model, samples, *, sparse=None, full=None, steps: int = 100, lr: float = 1e-5, alpha: float = 10.0,
              accum: int = 1, trainable: str = "all", p_sparse: float = 0.5, seed: int = 0, grad_clip: float = 1.0,
              out_dir=None, progress: bool = True) -> RunLog:
    """Train ``model`` in place; returns the run log (one row per step)."""
    from tqdm import tqdm

    if not samples:
        raise ValueError("samples is empty")
    if alpha < 0 or not 0.0 <= p_sparse <= 1.0 or steps < 1 or accum < 1:
        raise ValueError("need alpha >= 0, 0 <= p_sparse <= 1, steps >= 1, accum >= 1")
    sparse_nodes = layer_nodes(sparse or DEFAULT_SPARSE, model)
    full_nodes = layer_nodes(full or {"default": {"op": "dense"}}, model)
    params = set_trainable(model, trainable)
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise ValueError(f"model weights are {', '.join(low)}: SSA's updates (lr {lr:g}) vanish below a 16-bit "
                         "weight's rounding; load the model in float32 (attnzoo train ssa --dtype float32; on a GPU "
                         "the forward runs under bf16 autocast)")
    dev = params[0].device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps))
    rng = random.Random(seed)
    log = RunLog(out_dir)
    model.train()
    terms: list[tuple] = []
    mode = "full"

    def attention(q, k, v, ctx):
        o_full = full_nodes[ctx.layer_idx](q, k, v, ctx)
        o_sparse = sparse_nodes[ctx.layer_idx](q, k, v, ctx)
        terms.append(alignment_losses(o_full, o_sparse))
        return o_sparse if mode == "sparse" else o_full

    bar = tqdm(range(steps), desc="ssa", disable=not progress)
    with layer_attention(model, attention):
        for step in bar:
            opt.zero_grad(set_to_none=True)
            rec = {"ce": 0.0, "sparsity": 0.0, "commitment": 0.0, "loss": 0.0, "sparse_steps": 0}
            for micro in range(accum):
                s = samples[(step * accum + micro) % len(samples)]
                mode = "sparse" if rng.random() < p_sparse else "full"
                terms.clear()
                with autocast:  # samples are built on the CPU
                    ce = model(input_ids=s.input_ids.to(dev), labels=s.labels.to(dev), use_cache=False).loss
                sp = torch.stack([t[0] for t in terms]).mean()
                cm = torch.stack([t[1] for t in terms]).mean()
                loss = (ce + alpha * (sp + cm)) / accum
                loss.backward()
                rec["ce"] += float(ce.detach()) / accum
                rec["sparsity"] += float(sp.detach()) / accum
                rec["commitment"] += float(cm.detach()) / accum
                rec["loss"] += float(loss.detach())
                rec["sparse_steps"] += mode == "sparse"
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            row = log.add({"step": step, "lr": sched.get_last_lr()[0], **rec})
            bar.set_postfix(ce=f"{row['ce']:.3f}", align=f"{row['sparsity'] + row['commitment']:.4f}")
    model.eval()
    log.plot({"loss": ["loss", "ce"], "alignment": ["sparsity", "commitment"]}, "SSA training")
    return log
