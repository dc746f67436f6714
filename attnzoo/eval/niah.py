"""Needle-in-a-haystack prompts in the spirit of RULER's NIAH tasks, from offline text.

Haystacks are CPython's own documentation (``pydoc_data.topics``, shipped with Python). Needles
are sentences "The special magic number for <key> is: <5 digits>." placed at a depth (fraction
of the haystack). Tasks:

- ``single``: one needle, asked for;
- ``multikey``: the needle plus three distractor needles with other keys; one key is asked;
- ``multivalue``: two needles with the same key and different numbers; both must be answered.

Everything is deterministic for a seed: keys, numbers, the haystack offset. Calibration and
training use other seeds and ``offset``s than evaluation so that no prompt is shared.
Scoring is exact match: every expected number must appear in the generated text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

TASKS = ("single", "multikey", "multivalue")
WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "jasper",
         "kestrel", "lantern", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
         "umber", "velvet", "willow", "yarrow", "zephyr", "cobalt", "falcon", "meadow", "orchid", "summit")


PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n\n")
# generous enough for the model to restate the question before the number(s)
MAX_NEW_TOKENS = {"single": 32, "multikey": 32, "multivalue": 64}


@dataclass(frozen=True)
class NiahPrompt:
    task: str
    length: int  # target prompt length in tokens
    depth: float
    seed: int
    input_ids: torch.Tensor = field(repr=False, compare=False)  # [1, N]
    answers: tuple[str, ...]

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]


def haystack_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = ("What {is_are} {plural} for {key} mentioned in the text above? "
            "Answer with the {number_s} only.")


def check_settings(lengths=(), depths=(), tasks=()) -> None:
    """Prompt settings, checked before any tokenizer work (the CLI calls it before the model
    loads): lengths >= 256 tokens, depths in [0, 1], tasks among ``TASKS``."""
    for n in lengths:
        if n < 256:
            raise ValueError(f"a prompt needs at least 256 tokens, got length {n}")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {d:g}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; tasks: {','.join(TASKS)}")


def check_templates(needle: str, question: str) -> None:
    """Templates must name their fields: needle ``{key}`` and ``{value}``; question ``{key}`` (and
    may use ``{is_are}``, ``{plural}``, ``{number_s}``)."""
    for name, text, fields in (("needle", needle, ("{key}", "{value}")), ("question", question, ("{key}",))):
        if not isinstance(text, str):
            raise TypeError(f"{name} template must be a str, got {type(text).__name__}")
        missing = [f for f in fields if f not in text]
        if missing:
            raise ValueError(f"{name} template must contain {', '.join(fields)}; "
                             f"missing {', '.join(missing)}: {text!r}")
        try:
            text.format(key="k", value="v", is_are="is", plural="p", number_s="number")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{name} template has a field it cannot fill ({e!r}): {text!r}") from None


def _needles(task: str, rng: random.Random, needle: str = NEEDLE):
    keys = rng.sample(WORDS, 4)
    key = keys[0]
    numbers = [str(rng.randint(10000, 99999)) for _ in range(4)]

    def say(k, v):
        return needle.format(key=k, value=v)

    if task == "single":
        return [say(key, numbers[0])], key, (numbers[0],)
    if task == "multikey":
        others = keys[1:]
        needles = [say(key, numbers[0])] + [say(o, n) for o, n in zip(others, numbers[1:], strict=True)]
        rng.shuffle(needles)
        return needles, key, (numbers[0],)
    if task == "multivalue":
        while numbers[1] == numbers[0]:
            numbers[1] = str(rng.randint(10000, 99999))
        return [say(key, numbers[0]), say(key, numbers[1])], key, (numbers[0], numbers[1])
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _prompt_rng(task: str, length: int, depth: float, seed: int) -> random.Random:
    return random.Random(f"{task}/{length}/{depth}/{seed}")


def prompt_answers(task: str, length: int, depth: float, seed: int, needle: str = NEEDLE) -> tuple[str, ...]:
    """The answers ``make_prompt`` with these arguments hides, without building the prompt."""
    return _needles(task, _prompt_rng(task, length, depth, seed), needle)[2]


def make_prompt(tok, task: str, length: int, depth: float, seed: int, offset: int = 0, *,
                haystack: str | None = None, needle: str = NEEDLE, question: str = QUESTION,
                reserve: int = 0) -> NiahPrompt:
    """One chat-formatted prompt of about ``length`` tokens (the haystack is cut to fit).

    ``haystack``: the text the needles hide in (default: CPython's documentation topics);
    ``needle`` / ``question``: templates (see ``check_templates``), so users test on their own
    documents and phrasing. A haystack too short for ``length`` raises ``ValueError``.
    ``reserve``: cut the prompt to ``length - reserve`` tokens instead, keeping the needles of
    ``length`` (training appends the answer and wants prompt + answer = ``length``)."""
    check_settings(lengths=(length,), depths=(depth,), tasks=(task,))
    check_templates(needle, question)
    if not 0 <= reserve < length:
        raise ValueError(f"reserve must lie in [0, length={length}), got {reserve}")
    rng = _prompt_rng(task, length, depth, seed)
    needles, key, answers = _needles(task, rng, needle)
    many = task == "multivalue"
    question = question.format(key=key, is_are="are" if many else "is", number_s="numbers" if many else "number",
                               plural="all special magic numbers" if many else "the special magic number")
    text = haystack_text() if haystack is None else haystack
    if len(text) < 2:
        raise ValueError("haystack text is empty")
    start = (offset + rng.randint(0, len(text) // 2)) % (len(text) // 2)
    if haystack is None and len(text) - start < length * 6:
        # the documentation topics hold ~120K tokens: longer prompts (128K) read on from the start
        # again, the needles still once each
        text = text + "\n\n" + text * (1 + length * 6 // len(text))
    hay_ids = tok(text[start:start + length * 6], add_special_tokens=False).input_ids
    if len(hay_ids) < length // 2:  # a short custom haystack: read it from the start, and say so if short
        hay_ids = tok(text[: length * 6], add_special_tokens=False).input_ids
        if len(hay_ids) < length - 200:
            raise ValueError(f"the haystack holds about {len(hay_ids)} tokens; a {length}-token prompt needs "
                             f"about {length - 150} (use a longer text or shorter --lengths)")

    def render(n_hay: int) -> torch.Tensor:
        hay = tok.decode(hay_ids[:n_hay])
        cut = int(len(hay) * depth)
        # insert at a sentence or line boundary near the depth so needles read as text
        m = re.search(r"[.\n]\s", hay[cut:])
        at = cut + (m.end() if m and m.end() < 400 else 0)
        parts = [hay[:at]] + [" " + n + " " for n in needles] + [hay[at:]]
        if len(needles) > 1 and task == "multivalue":  # spread the second value further in
            second = min(len(hay), at + len(hay) // 5)
            parts = [hay[:at], " " + needles[0] + " ", hay[at:second], " " + needles[1] + " ", hay[second:]]
        content = PREAMBLE + "".join(parts) + "\n\n" + question
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]

    target = length - reserve
    ids = render(len(hay_ids))
    n_hay = max(0, len(hay_ids) - (ids.shape[1] - target))
    ids = render(n_hay)
    while ids.shape[1] > target and n_hay > 0:  # decoding and re-encoding can shift a few tokens
        n_hay -= ids.shape[1] - target
        ids = render(max(n_hay, 0))
    return NiahPrompt(task, length, depth, seed, ids, answers)


def suite(tok, lengths=(2048, 4096, 6144), depths=(0.1, 0.5, 0.9), tasks=TASKS, seed: int = 0,
          offset: int = 0, per_cell: bool = False, **templates) -> list[NiahPrompt]:
    """Prompts over lengths x tasks. With ``per_cell`` every (length, task, depth) gets a prompt;
    otherwise depths rotate across (length, task) cells, which keeps the suite small.
    ``templates``: ``haystack``, ``needle``, ``question`` (see ``make_prompt``)."""
    check_settings(lengths, depths, tasks)
    prompts = []
    i = 0
    for length in lengths:
        for task in tasks:
            for depth in (depths if per_cell else [depths[i % len(depths)]]):
                prompts.append(make_prompt(tok, task, length, depth, seed * 1000 + i, offset, **templates))
                i += 1
    return prompts


def score(text: str, answers) -> bool:
    """Exact match: every expected number appears as a whole number in ``text``."""
    found = set(re.findall(r"\d+", text))
    return all(a in found for a in answers)
