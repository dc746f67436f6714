"""Free-running agreement of generated tokens with full attention: how a stack's decode reads the cache.

Each prompt is plain text (CPython's documentation, the NIAH haystack) cut to a length; full
attention and the stack each generate ``new_tokens`` greedy tokens from it on their own (free
running, as a user sees them). Per prompt: the share of the ``new_tokens`` positions where the
stack's token equals full's, and the first position where they part. A stack whose decode step
reads the whole cache agrees exactly; a decode budget shows here as soon as it drops something
the next token needs. Scores carry the number of prompts and a bootstrap interval over prompts.

Free-running agreement compounds: once one token differs the texts part and every later position
counts as lost, so a small model with near-tied next tokens scores low even when each step is close
(on the embedded model at a 2K cache, Quest reading all but the 16 lowest-bound of 128 pages agreed
0.85; bench/results/2026-12-07-cpu-decode-tf). So each stack is also scored *teacher-forced*: it
decodes full attention's own continuation one token at a time (prefill, then one cached step per
token, its decode part reading the cache), and at every step its next-token distribution is compared
with full's on the same prefix: top-1 agreement and KL(full || stack) in nats, per step, then
averaged per prompt. That rates each decode step on its own, as the prefill's logit fidelity does.

``copy_decode`` is the copy task (``attnzoo.eval.copy``) read through the decode path: the prompt up
to the repeat's prime is prefilled, then the repeat's remaining tokens are fed one cached step at a
time, and a step scores when its argmax is the segment's next token. Only a decode step that reads
the hidden segment's keys, thousands of tokens back, can copy it; paired with full attention's score
on the same prompts.
"""

from __future__ import annotations

import torch

from ..integrations.hf import cache_keyword, returned_cache
from ..integrations.hf_patch import patch
from .niah import haystack_text
from .stats import bootstrap_ci, paired_difference

__all__ = ["text_prompts", "decode_agreement", "copy_decode"]


def text_prompts(tok, length: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` plain-text prompts of ``length`` tokens, from spread-out places of the haystack."""
    ids = tok(haystack_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < length + n:
        ids = torch.cat([ids] * (1 + (length + n) // ids.numel()))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g).tolist()
    return [ids[s:s + length][None] for s in starts]


@torch.no_grad()
def _greedy(model, ids, new_tokens: int) -> list[int]:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _forced_logprobs(model, ids, continuation: list[int]) -> torch.Tensor:
    """``[len(continuation), vocab]`` fp32 log-probabilities of the next token after the prompt and
    after each continuation token but the last: one prefill, then one cached decode step per token."""
    key = cache_keyword(model)
    out = model(input_ids=ids, use_cache=True)
    rows, past = [out.logits[0, -1]], returned_cache(out)
    for t in continuation[:-1]:
        out = model(input_ids=torch.tensor([[t]], device=ids.device), use_cache=True, **{key: past})
        rows.append(out.logits[0, -1])
        past = returned_cache(out)
    return torch.log_softmax(torch.stack(rows).float(), -1)


def decode_agreement(model, prompts, stacks: dict, new_tokens: int = 32, teacher_forced: bool = True) -> dict:
    """``{label: {"agreement", "ci", "first_divergence", "prompts", "new_tokens"}}`` for each stack
    (anything ``attnzoo.build`` takes) against full attention's own greedy tokens on the same prompts;
    with ``teacher_forced`` also ``"tf_top1"`` / ``"tf_top1_ci"`` and ``"tf_kl"`` / ``"tf_kl_ci"``: the
    per-step agreement with full's next-token argmax and KL(full || stack) in nats along full's own
    continuation (module doc)."""
    if not prompts:
        raise ValueError("decode_agreement needs at least one prompt")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    for i, p in enumerate(prompts):
        if not isinstance(p, torch.Tensor) or p.ndim != 2 or p.shape[0] != 1:
            raise ValueError(f"prompts[{i}] must be token ids [1, N] (one prompt each), got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # every continuation is new_tokens long
    try:
        with patch(model, {"name": "full", "default": {"op": "dense"}}):
            full = [_greedy(model, p.to(device), new_tokens) for p in prompts]
            # full's own distributions along its continuation (kept on the CPU: new_tokens x vocab each)
            ref_lp = [_forced_logprobs(model, p.to(device), ref).cpu() for p, ref in zip(prompts, full, strict=True)] \
                if teacher_forced else []
        out = {}
        for label, stack in stacks.items():
            shares, parts, top1, kl = [], [], [], []
            with patch(model, stack):
                for i, (p, ref) in enumerate(zip(prompts, full, strict=True)):
                    got = _greedy(model, p.to(device), new_tokens)
                    same = [a == b for a, b in zip(got, ref, strict=True)]
                    shares.append(sum(same) / new_tokens)
                    parts.append(same.index(False) if False in same else new_tokens)
                    if teacher_forced:
                        lp, rl = _forced_logprobs(model, p.to(device), ref).cpu(), ref_lp[i]
                        top1.append((lp.argmax(-1) == rl.argmax(-1)).float().mean().item())
                        kl.append((rl.exp() * (rl - lp)).sum(-1).clamp(min=0).mean().item())
            out[label] = {"agreement": sum(shares) / len(shares), "ci": list(bootstrap_ci(shares)),
                          "first_divergence": sum(parts) / len(parts), "prompts": len(prompts),
                          "new_tokens": new_tokens}
            if teacher_forced:
                out[label] |= {"tf_top1": sum(top1) / len(top1), "tf_top1_ci": list(bootstrap_ci(top1)),
                               "tf_kl": sum(kl) / len(kl), "tf_kl_ci": list(bootstrap_ci(kl))}
        return out
    finally:
        model.generation_config.eos_token_id = eos


def copy_decode(model, prompts, stacks: dict) -> dict:
    """``{label: {"copy", "ci", "vs_full", "diff": {"mean", "ci"}, "prompts"}}`` for ``"full"`` and each
    stack: copy accuracy (``attnzoo.eval.copy.CopyPrompt`` prompts) with the repeat decoded step by step
    after its prime (module doc), paired with full attention's on the same prompts."""
    if not prompts:
        raise ValueError("copy_decode needs at least one copy prompt")
    device = next(model.parameters()).device
    stacks = {"full": {"name": "full", "default": {"op": "dense"}}, **stacks}
    scores = {}
    for label, stack in stacks.items():
        acc = []
        with patch(model, stack):
            for p in prompts:
                cut = p.repeat_at + p.prime
                cont = p.input_ids[0, cut:p.repeat_at + p.segment_len]
                lp = _forced_logprobs(model, p.input_ids[:, :cut].to(device), cont.tolist())
                acc.append((lp.argmax(-1).cpu() == cont).float().mean().item())
        scores[label] = acc
    full = sum(scores["full"]) / len(prompts)
    return {label: {"copy": sum(acc) / len(acc), "ci": list(bootstrap_ci(acc)),
                    "vs_full": (sum(acc) / len(acc)) / full if full > 0 else None,
                    "diff": paired_difference(acc, scores["full"]), "prompts": len(prompts)}
            for label, acc in scores.items()}
