"""Elastic Attention router training (arXiv 2601.17367): a frozen backbone, one router per layer.

Forward, per layer: router logits z ``[B, Hkv, 2]`` from the layer's pooled pre-RoPE keys;
Gumbel noise and temperature T give p = softmax((z + g) / T); the straight-through gate
(onehot(argmax p) + p - sg(p)) is exactly one-hot going forward and has p's gradient going back;
m = gate[..., FA] repeated over each KV head's query group mixes O = m O_FA + (1 - m) O_SA
(both branches are computed for every head). Per sample, sparsity Omega = 1 - (FA heads) /
(all heads) over all layers. Loss = CE + l1 |Omega - t| + l2 (Omega - t)^2 with a target t and
multipliers (l1, l2) per task type; the multipliers rise by gradient *ascent*. T follows a
cosine from 1.5 to 1.0 over the first 60% of the steps.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from torch import nn

from ..routers.elastic import ElasticRouter
from .common import (
    RunLog,
    cosine_temperature,
    layer_attention,
    layer_nodes,
    micro_batches,
    pad_right,
    supervised_loss,
    warmup_cosine,
)
from .data import TASK_TYPES

DEFAULT_SPARSE = {"default": {"selector": {"name": "streaming", "sink": 64, "local": 256, "block_size": 64},
                              "op": "block_sparse"}}
DEFAULT_TARGETS = {"retrieval": 0.6, "other": 1.0}


class _StraightThrough(torch.autograd.Function):
    """onehot(argmax p) going forward, p's gradient going back: the value of
    onehot + p - sg(p), without its rounding (1 - 0.7 + 0.7 need not be exactly 1 in floats)."""

    @staticmethod
    def forward(ctx, p):
        return torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def gumbel_gate(z: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax gate over the last dim: one-hot forward, soft backward."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(z.shape, generator=generator, dtype=torch.float32).to(z.device)
    g = -torch.log(-torch.log(u + 1e-8) + 1e-8)
    p = torch.softmax((z.float() + g) / temperature, dim=-1)
    return _StraightThrough.apply(p)


class Multipliers(nn.Module):
    """Lagrange multipliers (l1, l2) per task type, initialised U(0, 0.5), kept >= 0."""

    def __init__(self, task_types=TASK_TYPES, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.task_types = tuple(task_types)
        self.values = nn.Parameter(torch.rand(len(self.task_types), 2, generator=g) * 0.5)

    def penalty(self, omega: torch.Tensor, target: float, task_type: str) -> torch.Tensor:
        l1, l2 = self.values[self.task_types.index(task_type)]
        d = omega - target
        return l1 * d.abs() + l2 * d.square()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.values.clamp_(min=0.0)


def checkpoint_run(path) -> dict:
    """What a ``checkpoint.pt`` of ``train_elastic`` was a run of (steps, batch, seed, number of
    samples, learning rates, gradient clip, targets): a resume must match it."""
    return torch.load(path, map_location="cpu", weights_only=True)["run"]


def train_elastic(model, samples, router: ElasticRouter | None = None, *, sparse=None, full=None,
                  targets: dict | None = None, steps: int = 100, batch: int = 4, lr: float = 5e-4,
                  lambda_lr: float = 1e-3, grad_clip: float = 5.0, seed: int = 0, out_dir=None,
                  progress: bool = True, max_seconds: float | None = None,
                  micro_batch_tokens: int | None = None, micro_batch_padding: bool = False,
                  checkpoint_every: int | None = None,
                  resume=None) -> tuple[ElasticRouter, RunLog]:
    """Train a router for ``model`` (kept frozen, on its own device); returns (router, run log).
    With ``out_dir``, writes ``router.pt`` (fp16 weights), ``log.jsonl`` and ``training.png``
    there. ``max_seconds``: stop after the step that crosses this wall-clock budget (the schedules
    still assume ``steps``; the log's last row says where it stopped). ``micro_batch_tokens``: run a
    step's samples of equal length together, in micro-batches of at most this many tokens (rows x
    length), instead of one by one: the same loss terms per sample in fewer, larger launches (one
    step on an H100 spent more host than GPU time one sample at a time). ``training_samples`` makes samples of
    one nominal length equally long. ``micro_batch_padding``: also group unequal lengths, right-padded;
    that was slower on an H100 (8-10 s per 16-sample step against 5-6 s one by one): a padding
    mask moves dense attention off cuDNN.

    A run can span several processes (a GPU lent for minutes at a time): with ``out_dir``,
    ``checkpoint.pt`` there holds everything the next step depends on (router weights in fp32, both
    optimisers, the schedule, the multipliers, the sample order, the Gumbel generator, the log so
    far); it is written when ``max_seconds`` stops the run and every ``checkpoint_every`` steps.
    ``resume`` (such a file) continues the run from its next step: the same ``samples``, ``steps``,
    ``batch``, ``seed``, learning rates, clip and targets are required, and the result equals a run
    never stopped."""
    from tqdm import tqdm

    if not samples:
        raise ValueError("samples is empty")
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be >= 1")
    if checkpoint_every is not None and (checkpoint_every < 1 or out_dir is None):
        raise ValueError(f"checkpoint_every must be >= 1 and needs out_dir, got {checkpoint_every} "
                         f"with out_dir={out_dir!r}")
    targets = dict(DEFAULT_TARGETS if targets is None else targets)
    for s in samples:
        if s.input_ids.ndim != 2 or s.input_ids.shape[0] != 1:
            raise ValueError(f"each Sample holds one sequence [1, N] (Omega is per sample), got "
                             f"{tuple(s.input_ids.shape)}")
        if s.task_type not in targets:
            raise ValueError(f"no target for task type {s.task_type!r}; targets: {targets}")
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    router = router or ElasticRouter(head_dim=head_dim, seed=seed)
    sparse_nodes = layer_nodes(sparse or DEFAULT_SPARSE, model)
    full_nodes = layer_nodes(full or {"default": {"op": "dense"}}, model)
    for i in range(len(full_nodes)):
        router.layer(i)
    router.layers.to(next(model.parameters()).device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(router.layers.parameters())
    for p in params:
        p.requires_grad_(True)
    lam = Multipliers(tuple(targets), seed=seed)
    # fused on CUDA: one kernel for all the router's small tensors instead of a launch chain per step
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=params[0].device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps))
    lam_opt = torch.optim.AdamW(lam.parameters(), lr=lambda_lr, weight_decay=0.0, maximize=True)
    gen = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    queue: list = []

    def next_sample():
        if not queue:  # shuffled passes over the samples, each seen once per pass
            queue.extend(order.sample(samples, len(samples)))
        return queue.pop()
    # what checkpoint_run returns: a resume must match it (the loaded optimiser and schedule would
    # otherwise silently keep the old run's learning rates)
    run = dict(steps=steps, batch=batch, seed=seed, n_samples=len(samples), lr=lr, lambda_lr=lambda_lr,
               grad_clip=grad_clip, targets=targets)
    state = None
    if resume is not None:  # read and checked before the log (which starts a new log.jsonl) exists
        state = torch.load(resume, map_location="cpu", weights_only=True)
        if state["run"] != run:
            raise ValueError(f"resume: {resume} is a checkpoint of a run with {state['run']}; this call has {run}")
    log = RunLog(out_dir)
    where = {id(x): i for i, x in enumerate(samples)}

    def checkpoint(next_step: int) -> None:
        torch.save({"next_step": next_step, "run": run, "router": router.layers.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "lam": lam.state_dict(),
                    "lam_opt": lam_opt.state_dict(), "gen": gen.get_state(), "order": order.getstate(),
                    "queue": [where[id(x)] for x in queue], "rows": log.rows}, log.out / "checkpoint.pt")

    start = 0
    if state is not None:
        router.layers.load_state_dict(state["router"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        lam.load_state_dict(state["lam"])
        lam_opt.load_state_dict(state["lam_opt"])
        gen.set_state(state["gen"])
        order.setstate(state["order"])
        queue[:] = [samples[i] for i in state["queue"]]
        log.restore(state["rows"])
        start = state["next_step"]
    run_t0 = time.perf_counter()
    gates: list[torch.Tensor] = []
    soft: list[torch.Tensor] = []
    temperature = 1.5

    def attention(q, k, v, ctx):
        z = router.logits(ctx.pre_rope_keys, ctx.layer_idx, ctx.key_padding_mask)
        m = gumbel_gate(z, temperature, gen)[..., 1]  # [B, Hkv], 1 = full attention
        gates.append(m)
        soft.append(torch.softmax(z.detach().float(), -1)[..., 1])  # noise-free P(FA), for the log
        o_fa = full_nodes[ctx.layer_idx](q, k, v, ctx)
        o_sa = sparse_nodes[ctx.layer_idx](q, k, v, ctx)
        mq = m.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[:, :, None, None].to(o_fa.dtype)
        return torch.lerp(o_sa, o_fa, mq)  # m O_FA + (1 - m) O_SA in one kernel each way

    model.eval()  # frozen backbone: no dropout; gradients still flow through its activations
    bar = tqdm(range(start, steps), desc="elastic", disable=not progress, initial=start, total=steps)
    with layer_attention(model, attention):
        for step in bar:
            temperature = cosine_temperature(step, steps)
            opt.zero_grad(set_to_none=True)
            lam_opt.zero_grad(set_to_none=True)
            step_samples = [next_sample() for _ in range(batch)]
            done, parts = [], []  # per-sample terms stay on the device until the step ends (no sync per group)
            for group in micro_batches(step_samples, [x.n_tokens for x in step_samples], micro_batch_tokens,
                                       pad=micro_batch_padding):
                gates.clear()
                soft.clear()
                ids, labels, mask = pad_right([(x.input_ids, x.labels) for x in group])
                ce = supervised_loss(model, ids, labels, None if bool(mask.all()) else mask, per_row=True)
                omega = 1.0 - torch.stack(gates).float().mean((0, 2))  # [rows]: per-sample sparsity
                soft_omega = 1.0 - torch.stack(soft).mean((0, 2))
                pens = torch.stack([lam.penalty(omega[j], targets[x.task_type], x.task_type)
                                    for j, x in enumerate(group)])
                ((ce.sum() + pens.sum()) / batch).backward()
                done += group
                parts.append(torch.stack([ce.detach().float(), pens.detach().float(), omega.detach(), soft_omega]))
            rec = {"ce": 0.0, "penalty": 0.0, "violation": 0.0, "expected_violation": 0.0, "loss": 0.0}
            omegas: dict[str, list[float]] = {t: [] for t in targets}
            for x, (ce_j, pen_j, om_j, soft_j) in zip(done, torch.cat(parts, 1).T.tolist(), strict=True):
                t = targets[x.task_type]
                rec["ce"] += ce_j / batch
                rec["penalty"] += pen_j / batch
                rec["violation"] += abs(om_j - t) / batch  # |Omega - t|
                rec["expected_violation"] += abs(soft_j - t) / batch
                omegas[x.task_type].append(om_j)
            rec["loss"] = rec["ce"] + rec["penalty"]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            lam_opt.step()
            lam.clamp_()
            for t, vals in omegas.items():
                rec[f"omega_{t}"] = sum(vals) / len(vals) if vals else None
            for i, t in enumerate(lam.task_types):
                rec[f"lambda1_{t}"], rec[f"lambda2_{t}"] = (float(x) for x in lam.values[i].detach())
            stop = max_seconds is not None and time.perf_counter() - run_t0 >= max_seconds and step + 1 < steps
            if stop:
                rec["stopped"] = f"wall-clock budget of {max_seconds} s reached after {step + 1} of {steps} steps"
            row = log.add({"step": step, "temperature": temperature, "lr": sched.get_last_lr()[0], **rec})
            bar.set_postfix(ce=f"{row['ce']:.3f}", **{f"Ω_{t[:3]}": f"{row[f'omega_{t}']:.2f}"
                                                      for t in targets if row[f"omega_{t}"] is not None})
            if out_dir is not None and (stop or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
                checkpoint(step + 1)
            if stop:
                break
    for p in params:
        p.requires_grad_(False)
    if out_dir is not None:
        router.save(log.out / "router.pt", dtype=torch.float16, meta=router_meta(model, sparse_nodes))
        log.plot({"loss": ["loss", "ce", "penalty", "violation"], "sparsity Ω": [f"omega_{t}" for t in targets],
                  "multipliers": [f"lambda{j}_{t}" for t in targets for j in (1, 2)]}, "Elastic router training")
    return router, log


def route_prior(model, samples, router: ElasticRouter | None = None, *, targets: dict | None = None,
                steps: int = 100, batch: int = 16, lr: float = 2e-3, seed: int = 0,
                progress: bool = True) -> ElasticRouter:
    """A stage before ``train_elastic`` (not in the paper): the router learns to hit each task type's
    sparsity target from its input alone. Straight-through Gumbel gates as in training, loss
    ``|Omega - t| + (Omega - t)^2`` per sample, no language-model loss; the pooled keys come from one
    dense forward of the frozen model per sample (no gradient through it), so a step costs only the
    routers' MLPs. Why: with the language-model loss from the first step every head drifts towards
    full attention and the multipliers take long to pull the task types apart (a CPU pilot at 1-2K
    tokens routed Omega 0.77 on copy prompts and 0.77 on text after 30 steps), although the pooled keys
    tell the two kinds apart (nearest centroid, leave one out: 97 % of 24 prompts at 1K).
    ``train_elastic(..., router=route_prior(...))`` then decides which heads, by the task's loss."""
    from ..integrations.hf import pre_rope_key_hooks
    from ..ops.head_router import pool_keys

    if not samples:
        raise ValueError("samples is empty")
    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be >= 1")
    targets = dict(DEFAULT_TARGETS if targets is None else targets)
    missing = sorted({s.task_type for s in samples} - set(targets))
    if missing:
        raise ValueError(f"no target for task types {missing}; targets: {targets}")
    dev = next(model.parameters()).device
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
        model.config.hidden_size // model.config.num_attention_heads
    router = router or ElasticRouter(head_dim=head_dim, seed=seed)
    pooled = []  # per sample: {layer: [1, Hkv, D]}
    with torch.no_grad(), pre_rope_key_hooks(model) as keys:
        for s in samples:
            model(input_ids=s.input_ids.to(dev), use_cache=False, logits_to_keep=1)
            pooled.append({i: pool_keys(keys[i], router.pool_tokens).float() for i in sorted(keys)})
    layers = sorted(pooled[0])
    mods = [router.layer(i).to(dev) for i in layers]
    params = [p for m in mods for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    for step in range(steps):
        temperature = cosine_temperature(step, steps)
        pick = [order.randrange(len(samples)) for _ in range(batch)]
        loss = 0.0
        for j in pick:
            gates = torch.stack([gumbel_gate(m(pooled[j][i]), temperature, gen)[..., 1]
                                 for i, m in zip(layers, mods, strict=True)])
            d = 1.0 - gates.float().mean() - targets[samples[j].task_type]
            loss = loss + (d.abs() + d.square()) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress and (step + 1) % max(1, steps // 10) == 0:
            print(f"route_prior step {step + 1}/{steps}: loss {float(loss.detach()):.4f}", flush=True)
    for p in params:
        p.requires_grad_(False)
    return router


def router_meta(model, sparse_nodes) -> dict:
    """What a router is trained for, saved in its file for ``weights: auto``: the model's shape and
    name, and the kind of sparse branch (the most common sparse node of the sparse stack over the layers)."""
    from collections import Counter

    from ..model_shape import ModelShape
    from ..stack import describe_node

    # the layers a sparse stack leaves dense (first:2 in the shipped ones) are not its sparse branch
    kinds = Counter(describe_node(n) for n in sparse_nodes)
    sparse = Counter({k: c for k, c in kinds.items() if k != "dense"}) or kinds
    kind = sparse.most_common(1)[0][0]
    return {"model": ModelShape.of(model).to_config(), "sparse": kind}


def file_router(path) -> Path:
    """Copy a trained router (with its ``meta``) to where ``weights: auto`` looks; returns the copy."""
    import re
    import shutil

    from ..routers.elastic import trained_router_dir

    meta = torch.load(path, map_location="cpu", weights_only=True).get("meta") or {}
    if "model" not in meta:
        raise ValueError(f"{path}: the router file does not say which model it was trained for")
    kind = meta["sparse"].replace("->", "-")  # xattention->block_sparse: xattention-block_sparse
    stem = re.sub(r"[^\w.-]+", "_", f"{meta['model'].get('name') or 'model'}--{kind}")
    dest = trained_router_dir() / f"{stem}.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
    return dest


@torch.no_grad()
def router_sparsity(model, router: ElasticRouter, input_ids: torch.Tensor) -> float:
    """Omega the router's inference decisions (no noise, argmax) give for one prompt."""
    from ..integrations.hf import pre_rope_key_hooks

    with pre_rope_key_hooks(model) as keys:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
        fa = [router.logits(keys[i], i).argmax(-1).float() for i in sorted(keys)]
    return 1.0 - float(torch.cat([f.flatten() for f in fa]).mean())
