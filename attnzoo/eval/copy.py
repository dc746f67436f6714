"""Long-range copy: a task the model can do far past where it can answer a needle question.

A segment of ``segment_len`` tokens is hidden at a depth of real text (CPython's documentation,
as NIAH's haystack) and repeated at the end of the prompt, after a short cue. The prompt is
teacher-forced: one forward pass, and the score is how many of the repeat's last
``segment_len - prime`` tokens the model predicts (argmax) given the true tokens before each —
copying needs the hidden segment's keys, thousands of tokens back. The first ``prime`` tokens of
the repeat are given unscored: they are what an induction head matches to find the segment.

The same forward pass also scores **logit fidelity**: the ``text_window`` positions just before
the cue are plain text, where every stack's next-token distribution is compared with full
attention's (``attnzoo.eval.fidelity``). The layout, in tokens::

    [ text ... | segment | text ... | text window (plain, KL scored) | cue | segment again ]
               ^ depth x (N - window - cue - segment)                      ^ copy scored after prime

Segments are either ``random`` token ids (nothing in the model's prior predicts them: only
copying scores) or ``text`` (a passage from elsewhere in the documentation, what a user's long
context repeats; the prior can guess some tokens, so full attention's score on the same prompt
is the yardstick either way). Everything is deterministic for a seed; calibration and training
draw other seeds and haystack offsets than evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .niah import haystack_text

SEGMENTS = ("random", "text")
CUE = "\n\nAs quoted above:\n"
SEGMENT_LEN, PRIME, TEXT_WINDOW = 64, 16, 256


@dataclass(frozen=True)
class CopyPrompt:
    length: int  # target length in tokens (the prompt has exactly this many)
    depth: float  # where the hidden segment starts, as a fraction of the text before the window
    seed: int
    segment: str  # "random" or "text"
    input_ids: torch.Tensor = field(repr=False, compare=False)  # [1, N]
    hidden_at: int  # position of the hidden segment's first token
    repeat_at: int  # position of the repeat's first token
    segment_len: int
    prime: int
    window: tuple[int, int]  # [a, b): plain-text positions whose next token is scored for fidelity

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def distance(self) -> int:
        """Tokens between the hidden segment and its repeat: how far back copying must reach."""
        return self.repeat_at - self.hidden_at

    @property
    def copy_positions(self) -> tuple[int, int]:
        """``[a, b)``: positions whose logits predict the scored repeat tokens (position p predicts p + 1)."""
        return self.repeat_at + self.prime - 1, self.repeat_at + self.segment_len - 1

    @property
    def first_logit(self) -> int:
        """The first position any score needs: ``model(..., logits_to_keep=N - first_logit)``."""
        return min(self.window[0], self.copy_positions[0])


def check_copy_settings(lengths=(), depths=(), segment: str = "random", segment_len: int = SEGMENT_LEN,
                        prime: int = PRIME, text_window: int = TEXT_WINDOW) -> None:
    """Copy settings, checked before any tokenizer work (the CLI calls it before the model loads)."""
    if segment not in SEGMENTS:
        raise ValueError(f"segment must be one of {SEGMENTS}, got {segment!r}")
    for name, value, low in (("segment_len", segment_len, 2), ("prime", prime, 1), ("text_window", text_window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if prime >= segment_len:
        raise ValueError(f"prime ({prime}) must be shorter than segment_len ({segment_len}): "
                         f"the tokens after the prime are what is scored")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {d:g}")
    need = 2 * segment_len + text_window + 64
    for n in lengths:
        if n < need:
            raise ValueError(f"a copy prompt of segment_len {segment_len} and text_window {text_window} needs at "
                             f"least {need} tokens, got length {n}")


def _text_ids(tok, text: str, start: int, n: int) -> list[int]:
    """About ``n`` tokens of ``text`` from character ``start`` on (wrapping round), at a line start."""
    nl = text.find("\n", start)
    start = nl + 1 if 0 <= nl < start + 2000 else start
    ids: list[int] = []
    while len(ids) < n:
        chunk = text[start:start + 6 * (n - len(ids)) + 64]
        ids += tok(chunk, add_special_tokens=False).input_ids
        start = (start + len(chunk)) % len(text)
    return ids[:n]


def _special_ids(tok) -> set[int]:
    return set(getattr(tok, "all_special_ids", []) or [])


def make_copy_prompt(tok, length: int, depth: float, seed: int, *, segment: str = "random",
                     segment_len: int = SEGMENT_LEN, prime: int = PRIME, text_window: int = TEXT_WINDOW,
                     cue: str = CUE, haystack: str | None = None, offset: int = 0) -> CopyPrompt:
    """One copy prompt of exactly ``length`` tokens (see the module docstring for the layout)."""
    check_copy_settings((length,), (depth,), segment, segment_len, prime, text_window)
    rng = random.Random(f"copy/{length}/{depth}/{seed}/{segment}")
    text = haystack_text() if haystack is None else haystack
    if len(text) < 1000:
        raise ValueError(f"haystack holds {len(text)} characters; a copy prompt needs a long text")
    cue_ids = tok(cue, add_special_tokens=False).input_ids
    # what the tokenizer puts before any text (a BOS for Llama-style models; nothing for SmolLM2):
    # a model reads its prompts with it
    lead = tok("", add_special_tokens=True).input_ids
    n_text = length - 2 * segment_len - len(cue_ids) - len(lead)
    if n_text < text_window + 16:
        raise ValueError(f"length {length} leaves {n_text} text tokens; need > text_window + 16 = {text_window + 16}")
    half = len(text) // 2
    start = (offset + rng.randrange(half)) % half
    hay = _text_ids(tok, text, start, n_text)
    if segment == "random":
        special = _special_ids(tok)
        # ids from the tokenizer's own range, no special tokens (their rows are untrained)
        vocab = len(tok)
        seg = []
        while len(seg) < segment_len:
            t = rng.randrange(vocab)
            if t not in special:
                seg.append(t)
    else:  # a passage from the far side of the documentation: not part of this prompt's haystack
        seg = _text_ids(tok, text, (start + half + rng.randrange(half // 2)) % len(text), segment_len)
    room = n_text - text_window  # the hidden segment goes in the text before the fidelity window
    at = int(round(depth * room))
    ids = lead + hay[:at] + seg + hay[at:] + cue_ids + seg
    assert len(ids) == length, (len(ids), length)
    repeat_at = length - segment_len
    window_end = len(lead) + n_text + segment_len  # end of the text (the cue starts here)
    return CopyPrompt(length, depth, seed, segment, torch.tensor([ids]), len(lead) + at, repeat_at, segment_len,
                      prime, (window_end - text_window - 1, window_end - 1))


def copy_suite(tok, lengths, depths, per_cell: int = 1, seed: int = 0, **options) -> list[CopyPrompt]:
    """``per_cell`` prompts for every (length, depth), each from its own seed."""
    if isinstance(per_cell, bool) or not isinstance(per_cell, int) or per_cell < 1:
        raise ValueError(f"per_cell must be an integer >= 1, got {per_cell!r}")
    return [make_copy_prompt(tok, n, d, seed * 1000 + i, **options)
            for n in lengths for d in depths for i in range(per_cell)]


def copy_accuracy(logits: torch.Tensor, prompt: CopyPrompt, first: int | None = None) -> tuple[int, int]:
    """``(correct, scored)``: argmax predictions of the repeat's tokens after its prime.

    ``logits`` ``[1, L, V]`` are the last ``L`` positions' (``first``: the position of
    ``logits[:, 0]``, default ``N - L``)."""
    first = prompt.n_tokens - logits.shape[1] if first is None else first
    a, b = prompt.copy_positions
    if a < first:
        raise ValueError(f"logits start at position {first}; copy scoring needs positions from {a} "
                         f"(keep {prompt.n_tokens - prompt.first_logit} logits)")
    pred = logits[0, a - first:b - first].argmax(-1).cpu()
    target = prompt.input_ids[0, a + 1:b + 1]
    return int((pred == target).sum()), int(target.numel())
