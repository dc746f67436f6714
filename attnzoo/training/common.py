"""Pieces both trainers share: a per-layer training attention function, schedules, logging."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import without_dense_below
from ..integrations.hf import autocast_inputs, decoder_layers, key_padding_mask_of, pre_rope_key_hooks, use_attention
from ..stack import CallContext, build


def layer_nodes(stack, model) -> list:
    """One stack node per decoder layer of ``model`` (anything ``attnzoo.build`` takes), with every
    ``dense_below`` switch removed: a preset's speed switch (e.g. ``xattention``: dense below 24,576
    keys on CUDA) would otherwise make the sparse branch dense at training lengths, silently."""
    stack = build(without_dense_below(build(stack).to_config())).for_model(model)
    return [stack.node_for(i) for i in range(len(decoder_layers(model)))]


def supervised_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask=None,
                    per_row: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions ``labels`` supervises (-100 elsewhere),
    the same value as ``model(input_ids, labels=labels).loss``; ``per_row``: one mean per batch row
    ``[B]`` instead. Where the model takes ``logits_to_keep``, only the logits from the first
    supervised position on are formed (a 16K prompt with a 10-token answer would otherwise build
    16K x vocabulary logits for nothing)."""
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device), labels.to(device)
    extra = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    supervised = (labels[:, 1:] != -100).any(0).nonzero()
    if supervised.numel() == 0:
        raise ValueError("labels supervise no position after the first")
    first = 1
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        first = int(supervised[0]) + 1  # the first supervised label; the logit before it predicts it
        extra["logits_to_keep"] = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, use_cache=False, **extra).logits[:, -(input_ids.shape[1] - first + 1):]
    target = labels[:, first:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none")
    counts = (target != -100).sum(-1)
    if not per_row:
        return ce.sum() / counts.sum()
    if bool((counts == 0).any()):
        raise ValueError("a row of labels supervises no position after the first")
    return ce.sum(-1) / counts


def pad_right(rows, pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """``[1, n_i]`` (input_ids, labels) pairs to ``[B, max n]`` tensors padded on the right, with
    the attention mask (1 = real token). Right padding keeps every real token at its own position,
    and causal attention never looks right of a token, so real tokens see what they saw alone."""
    for x, y in rows:
        if x.ndim != 2 or x.shape[0] != 1 or y.shape != x.shape:
            raise ValueError(f"pad_right takes [1, n] input_ids with labels of the same shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    n = max(ids.shape[1] for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : x.shape[1]], labels[i, : y.shape[1]], mask[i, : x.shape[1]] = x[0], y[0], 1
    return ids, labels, mask


def micro_batches(items, lengths, max_tokens: int | None, pad: bool = True) -> list[list]:
    """``items`` grouped by length (shortest first) into micro-batches whose padded size
    (rows x longest) stays within ``max_tokens``; ``None``: one item per micro-batch. ``pad=False``:
    only items of equal length share a micro-batch (no padding at all)."""
    if max_tokens is None:
        return [[x] for x in items]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[i] > max_tokens or (not pad and lengths[i] != lengths[cur[0]])):
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return [[items[i] for i in g] for g in groups]


@contextlib.contextmanager
def layer_attention(model, fn):
    """Run ``model`` with ``fn(q, k, v, ctx: CallContext) -> out [B, Hq, N, D]`` as every layer's
    attention (ctx carries the layer index, padding, scale and the layer's pre-RoPE keys)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout:
            raise ValueError(f"attnzoo training implements no attention dropout, got {dropout}")
        query, key, value = autocast_inputs(query, key, value)
        ctx = CallContext(key_padding_mask=key_padding_mask_of(attention_mask, key), layer_idx=module.layer_idx,
                          scale=scaling, pre_rope_keys=keys.get(module.layer_idx))
        return fn(query, key, value, ctx).transpose(1, 2).contiguous(), None

    with pre_rope_key_hooks(model) as keys, use_attention(model, attention, prefix="attnzoo_train"):
        yield


def cosine_temperature(step: int, steps: int, start: float = 1.5, end: float = 1.0, frac: float = 0.6) -> float:
    """Cosine decay from ``start`` to ``end`` over the first ``frac`` of the steps, then ``end``."""
    horizon = frac * steps
    if horizon <= 0 or step >= horizon:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / horizon))


def warmup_cosine(step: int, steps: int, warmup: float = 0.2) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` of the steps, then cosine to 0."""
    w = max(1, int(round(warmup * steps)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


class RunLog:
    """Per-step records: kept in memory, appended to ``DIR/log.jsonl``, plotted to ``training.png``."""

    def __init__(self, out_dir=None):
        self.rows: list[dict] = []
        self.out = Path(out_dir) if out_dir is not None else None
        self.t0 = time.perf_counter()
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "log.jsonl").write_text("")

    def restore(self, rows: list[dict]) -> None:
        """Continue a resumed run's log: its rows first (``log.jsonl`` rewritten), and the clock
        from its last row's seconds."""
        self.rows = [dict(r) for r in rows]
        if rows:
            self.t0 = time.perf_counter() - rows[-1]["seconds"]
        if self.out is not None:
            (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: dict) -> dict:
        row = {**row, "seconds": round(time.perf_counter() - self.t0, 2)}
        self.rows.append(row)
        if self.out is not None:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def plot(self, panels: dict[str, list[str]], title: str) -> Path | None:
        """One subplot per panel, each plotting the listed keys against the step."""
        if self.out is None or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
        steps = [r["step"] for r in self.rows]
        for ax, (name, keys) in zip(axes[0], panels.items(), strict=True):
            for key in keys:
                ys = [r.get(key) for r in self.rows]
                pts = [(s, y) for s, y in zip(steps, ys, strict=True) if y is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=key, lw=1.2)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        path = self.out / "training.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
