"""Offline training data: retrieval prompts (NIAH-style, several keys; long-range copy) and
continuation of CPython documentation text, each with its task type and loss labels.

Seeds and haystack offsets are disjoint from the evaluation suite (seed 0, offset 0) and from
the shipped calibration (seed 7, offset 40 000).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..eval.copy import make_copy_prompt
from ..eval.niah import haystack_text, make_prompt, prompt_answers

TRAIN_SEED = 100
TRAIN_OFFSET = 80_000
TASK_TYPES = ("retrieval", "other")


@dataclass(frozen=True)
class Sample:
    task_type: str  # "retrieval" or "other"
    input_ids: torch.Tensor = field(repr=False)  # [1, N]
    labels: torch.Tensor = field(repr=False)  # [1, N], -100 outside the supervised answer

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]


def retrieval_sample(tok, length: int, seed: int, offset: int = TRAIN_OFFSET) -> Sample:
    """A multi-key needle prompt followed by its answer, ``length`` tokens in all where the
    tokenizer allows (samples of one length then batch without padding; rarely a token short); the
    loss covers the answer tokens."""
    depth = random.Random(seed).choice((0.1, 0.3, 0.5, 0.7, 0.9))
    answer = prompt_answers("multikey", length, depth, seed)[0]
    answer = tok(answer + (tok.eos_token or ""), add_special_tokens=False, return_tensors="pt").input_ids
    p = make_prompt(tok, "multikey", length, depth, seed, offset, reserve=answer.shape[1])
    for _ in range(3):  # re-encoding the cut haystack can fall a token or two short: ask for more
        short = length - answer.shape[1] - p.n_tokens
        if short <= 0:
            break
        longer = make_prompt(tok, "multikey", length, depth, seed, offset, reserve=max(0, answer.shape[1] - short))
        if longer.n_tokens + answer.shape[1] > length:
            break
        p = longer
    ids = torch.cat([p.input_ids, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer.shape[1]:] = answer
    return Sample("retrieval", ids, labels)


def copy_sample(tok, length: int, seed: int, offset: int = TRAIN_OFFSET) -> Sample:
    """A long-range copy prompt (``attnzoo.eval.copy``, a random-token segment at a random depth,
    another seed and haystack offset than evaluation): a retrieval task whose loss covers the
    repeat's tokens after its prime — only attention that reaches the hidden segment lowers it."""
    depth = random.Random(seed).choice((0.1, 0.3, 0.5, 0.7, 0.9))
    p = make_copy_prompt(tok, length, depth, seed, offset=offset)
    labels = torch.full_like(p.input_ids, -100)
    start = p.repeat_at + p.prime
    labels[:, start:] = p.input_ids[:, start:]
    return Sample("retrieval", p.input_ids, labels)


def continuation_sample(tok, length: int, seed: int, offset: int = TRAIN_OFFSET, supervised: int = 64) -> Sample:
    """``length`` tokens of documentation text; the loss covers the last ``supervised`` tokens
    (continuing a long text needs no exact retrieval of one far token)."""
    text = haystack_text()
    rng = random.Random(seed)
    start = (offset + rng.randint(0, len(text) // 2)) % (len(text) // 2)
    ids = tok(text[start:start + length * 6], add_special_tokens=False, return_tensors="pt").input_ids[:, :length]
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    return Sample("other", ids, labels)


def training_samples(tok, n: int, lengths=(512, 1024), seed: int = TRAIN_SEED, offset: int = TRAIN_OFFSET,
                     retrieval_share: float = 0.5, copy_share: float = 0.0) -> list[Sample]:
    """``n`` samples alternating task types (``retrieval_share`` of them retrieval, and of those a
    ``copy_share`` long-range copy prompts, the rest needle prompts), lengths drawn from
    ``lengths``; deterministic in ``seed``."""
    for name, share in (("retrieval_share", retrieval_share), ("copy_share", copy_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice(tuple(lengths))
        s = seed * 10_000 + i
        if rng.random() < retrieval_share:
            copy = copy_share > 0 and rng.random() < copy_share  # no draw at 0: old seeds keep their samples
            out.append((copy_sample if copy else retrieval_sample)(tok, length, s, offset))
        else:
            out.append(continuation_sample(tok, length, s, offset))
    return out
