"""`attnzoo compare`: accuracy vs attention density vs prefill time of stacks on one model.

Every preset (a shipped name or a stack YAML) answers the same NIAH prompts with greedy decoding;
presets are interleaved (each prompt goes through every preset, in an order rotated per prompt).
Per preset: accuracy (exact match, with a 95 % Wilson interval), mean attention density actually
used during prefill (over layers and heads; dense layers count 1.0), prefill time (synchronised
on a GPU, the median of ``repeats``) and its ratio to the ``full`` preset measured in the same
process (with the spread of the per-prompt ratios), and peak memory of one prefill.

Defaults follow the device: on a GPU, bf16, NIAH at 8K/16K/32K tokens (the embedded model
YaRN-extended x4 to 32K), three tasks x five depths per length (45 prompts per preset), copy at
8K-64K, each copy prompt on the smallest YaRN factor that holds it; on a CPU, fp32 at 2K/3K.
The table and plot live in ``attnzoo.eval.report``.

Beside NIAH (``evals``), the fidelity measures of ``attnzoo.eval.copy_compare``: long-range copy
accuracy, KL and top-1 agreement with full attention on plain text, and attention recall per layer
and head — measures on which full attention itself succeeds at lengths where it cannot answer a
needle question, so stacks can be told apart there.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..config import ConfigError, load_config, preset_spec, without_dense_below
from ..integrations.hf import cache_keyword, returned_cache
from ..integrations.hf_patch import patch
from ..stack import DensityMeter, build
from .copy import copy_suite
from .copy_compare import run_copy, summarise_copy
from .memory import peak_memory
from .niah import MAX_NEW_TOKENS, score, suite
from .report import summarise

DEFAULT_PRESETS = ("full", "xattention", "xattention-calibrated", "streaming", "topk-blocks", "token-sparse",
                   "token-sparse-calibrated", "token-sparse-xattention", "router-table-example",
                   "elastic-fa-xa", "elastic-fa-streaming", "elastic-xa-streaming")
EVALS = ("niah", "copy")  # copy includes logit fidelity (its plain-text window) and attention recall
# a prompt full attention answers (fp32 CPU; at depth 0.5 it talks past the 32-token budget)
# the quick copy prompt is long enough that a stack can lose the segment: at 1,536 tokens and depth 0.1
# it sits past streaming's sink and outside its 1,024-token window (a 1K prompt fit every window)
QUICK = {"lengths": (1024,), "tasks": ("single",), "depths": (0.3,),
         "copy_lengths": (1536,), "copy_depths": (0.1,), "copy_per_cell": 1}
# all twelve shipped presets took 10-12 minutes on 2 CPU cores (model cached: 9 min 58 s, 11 min 34 s, 10 min 43 s);
# widen with --lengths/--tasks/--depths
FULL = {"lengths": (2048, 3072), "tasks": ("single", "multikey"), "depths": (0.1, 0.5, 0.9),
        "copy_lengths": (2048, 3072), "copy_depths": (0.1, 0.5), "copy_per_cell": 1}
# every (length, task, depth) cell: 3 x 3 x 5 = 45 prompts per preset
GPU = {"lengths": (8192, 16384, 32768), "tasks": ("single", "multikey", "multivalue"),
       "depths": (0.1, 0.3, 0.5, 0.7, 0.9), "per_cell": True,
       # copy reaches past NIAH: full attention still copies at 32K (YaRN x8 for 64K). 16 prompts per
       # cell: 95 % intervals of half-width <= 0.05 for every shipped preset on an H100 (12 left two at
       # +-0.055; 6 gave +-0.05-0.085: bench/results/2026-12-07-h100-fidelity-fits)
       "copy_lengths": (8192, 16384, 32768, 65536), "copy_depths": (0.1, 0.5, 0.9), "copy_per_cell": 16}
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"
EVAL_SEED = 0  # calibration and training use other seeds and haystack offsets
EMBEDDED_CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings (checked against the model once loaded)


@torch.no_grad()
def _answer(model, tok, ids: torch.Tensor, max_new_tokens: int, repeats: int = 1, meter=None, answers=()):
    """Greedy decode; returns (text, prefill seconds: the median of ``repeats`` prefills). The
    density ``meter`` is reset before each prefill, so it holds one prefill's densities. Decoding
    stops early once the text holds every expected answer: later tokens cannot unscore it (exact
    match looks for the numbers anywhere), so the score is the same and a GPU run is ~2x shorter."""
    times = []
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    for _ in range(repeats):
        out = None  # free the previous prefill's cache first: peak memory stays that of one prefill
        if meter is not None:
            meter.reset()
        sync()  # a GPU prefill is timed from an idle device to its last kernel
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync()
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    cache_arg = cache_keyword(model)
    past, nxt = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [nxt]
    for _ in range(max_new_tokens - 1):
        if int(nxt) == tok.eos_token_id:
            break
        if answers and len(tokens) % 4 == 0 and score(tok.decode(torch.cat(tokens, 1)[0]), answers):
            break
        out = model(nxt, use_cache=True, **{cache_arg: past})
        past, nxt = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
    return tok.decode(torch.cat(tokens, 1)[0], skip_special_tokens=True), prefill


def _by_length_round_robin(prompts):
    """Prompts reordered so lengths alternate (8K, 16K, 32K, 8K, ...): a run stopped early, or its
    checkpoint, covers every length."""
    groups: dict[int, list] = {}
    for p in prompts:
        groups.setdefault(p.length, []).append(p)
    out = []
    for i in range(max(len(g) for g in groups.values())):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device: str) -> torch.dtype:
    """``None``/``"auto"``: bf16 on a GPU, fp32 on a CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    return DTYPES[dtype]


def defaults(device: str, quick: bool = False) -> dict:
    """The prompt settings a run uses when none are given."""
    if quick:
        return dict(QUICK)
    return dict(GPU if device.startswith("cuda") else FULL)


def run(presets=DEFAULT_PRESETS, *, lengths=None, tasks=None, depths=None, quick: bool = False,
        max_new_tokens: int | None = None, seed: int = EVAL_SEED, model=None, tok=None, progress: bool = True,
        repeats: int = 1, baseline_repeats: int = 3, device: str = "auto", dtype=None, model_spec: str = "embedded",
        context: int | None = None, checkpoint=None, sparse_everywhere: bool = False, warmup: bool | None = None,
        per_cell: bool | None = None, evals=None, copy_lengths=None, copy_depths=None, copy_per_cell=None,
        copy_options: dict | None = None, recall_rows: int | None = 64, copy_yarn: str = "per-length",
        **templates) -> dict:
    """Run the comparison; returns the ``results.json`` dict. ``repeats``: prefills timed per prompt
    and preset (the median is reported); ``full``, the denominator of every ratio, is timed
    ``max(repeats, baseline_repeats)`` times, so one slow baseline prefill does not move every
    preset's ratio for that prompt together. ``device``/``dtype``: where and in what precision the
    model runs (auto: CUDA and bf16 when present). ``model_spec``: ``"embedded"``, a ``.gguf``
    file or a local HF folder (ignored when ``model``/``tok`` are given). ``context``: extend the
    model with YaRN to this many tokens (default: the longest default length where that is past
    the model's context; lengths given without a context must fit the model's). ``checkpoint``:
    called with the results so far after each prompt (every preset answered it), so a long run
    that is stopped keeps what it measured. ``sparse_everywhere``: drop every preset's ``dense_below``
    switch (``attnzoo.config.without_dense_below``), to measure the methods' accuracy and density
    at every length rather than the speed-tuned presets. ``per_cell``: a prompt for every (length,
    task, depth) cell instead of one depth per (length, task) cell, rotated (default: on a GPU).
    ``warmup`` (default: on CUDA): run each preset once untimed at every new prompt length in tokens
    before timing it: Triton compiles and cuDNN builds an attention plan per shape, and prompts of
    one target length differ by a few tokens (a first 16,383-token prefill of ``full`` took 601 ms
    against 47 ms once warm, H200). ``templates``: ``haystack``, ``needle``, ``question`` for the
    prompts (``attnzoo.eval.niah.make_prompt``).
    ``evals``: ``"niah"`` and/or ``"copy"`` (default both). ``copy_lengths``, ``copy_depths``,
    ``copy_per_cell`` (prompts per length x depth): the copy prompts (defaults per device);
    ``copy_options``: ``segment`` ("random"/"text"), ``segment_len``, ``prime``, ``text_window``,
    ``cue`` (``attnzoo.eval.copy.make_copy_prompt``); ``recall_rows``: query rows the recall probe
    samples per layer on the first copy prompt of each length (None: no recall). ``copy_yarn``:
    ``"per-length"`` fits the model's YaRN factor to each copy prompt's length (the smallest that
    holds it; ``attnzoo.models.fit_context``), so full attention copies as well as it can at every
    length; ``"run"`` keeps the run's one factor for every prompt."""
    for arg, value in (("repeats", repeats), ("baseline_repeats", baseline_repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
    base_repeats = max(repeats, baseline_repeats)
    from tqdm import tqdm

    from ..models import extend_context, fit_context, load_model
    from .copy import check_copy_settings

    if copy_yarn not in ("per-length", "run"):
        raise ValueError(f"copy_yarn must be 'per-length' or 'run', got {copy_yarn!r}")
    evals = tuple(EVALS if evals is None else evals)
    if not evals or any(e not in EVALS for e in evals):
        raise ValueError(f"evals must be a non-empty subset of {EVALS}, got {evals!r}")
    device = resolve_device(device)
    dt = resolve_dtype(dtype, device)
    settings = defaults(device, quick)
    for name, value in (("lengths", lengths), ("tasks", tasks), ("depths", depths), ("copy_lengths", copy_lengths),
                        ("copy_depths", copy_depths)):
        if value:
            settings[name] = tuple(value)
    if copy_per_cell is not None:
        settings["copy_per_cell"] = copy_per_cell
    copy_options = dict(copy_options or {})
    check_copy_settings(settings.get("copy_lengths", ()), settings.get("copy_depths", ()), **copy_options)
    per_cell = settings.pop("per_cell", False) if per_cell is None else bool(per_cell)
    if "copy" not in evals:
        settings = {k: v for k, v in settings.items() if not k.startswith("copy_")}
    if "niah" not in evals:
        settings = {k: v for k, v in settings.items() if k not in ("lengths", "tasks", "depths")}
    # the lengths the run's one context must hold: copy prompts fitted per length extend the model
    # themselves, so with NIAH in the run its lengths alone set the context (as before copy existed)
    fitted = copy_yarn == "per-length" and "copy" in evals
    held = [*settings.get("lengths", ())] + ([] if fitted else [*settings.get("copy_lengths", ())])
    held = held or [*settings.get("copy_lengths", ())]
    presets = list(presets)
    if "full" not in presets:
        presets.insert(0, "full")  # the reference for accuracy and speed ratios
    # fail on a bad preset before any model work
    stacks = {p: build(without_dense_below(load_config(preset_spec(p))) if sparse_everywhere else preset_spec(p))
              for p in presets}
    if model is None:
        model, tok = load_model(model_spec, dt, device)
    try:  # every stack meets the model before any prompt runs: one that does not fit says how to fit it
        stacks = {p: s.for_model(model) for p, s in stacks.items()}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # YaRN where asked (``context``), or where the device's default lengths need it (GPU: 32K)
    native = getattr(model.config, "max_position_embeddings", None)
    want = context or (max(held) if not (lengths or (copy_lengths and not fitted)) else None)
    factor = extend_context(model, want) if native and want and want > native else 1
    ctx = getattr(model.config, "max_position_embeddings", None)
    too_long = sorted({n for n in (settings.get("lengths", ()) if fitted else held) if ctx and n > ctx})
    if too_long:
        raise ValueError(f"lengths {too_long} are past the model's context ({ctx} tokens; --context extends it)")
    prompts = [] if "niah" not in evals else _by_length_round_robin(
        suite(tok, settings["lengths"], settings["depths"], settings["tasks"], seed=seed, per_cell=per_cell,
              **templates))
    copy_prompts = [] if "copy" not in evals else _by_length_round_robin(
        copy_suite(tok, settings["copy_lengths"], settings["copy_depths"], settings["copy_per_cell"], seed=seed,
                   haystack=templates.get("haystack"), **copy_options))
    # Presets are interleaved: every prompt goes through every preset before the next prompt, in an
    # order rotated per prompt, so a change in the machine's load lands on all presets alike and
    # each prompt gives one full / preset prefill ratio (the table shows their spread).
    def meta(complete: bool) -> dict:
        return {
            "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
                         "max_new_tokens": max_new_tokens or dict(MAX_NEW_TOKENS), "seed": seed,
                         "prefill_repeats": repeats, "baseline_prefill_repeats": base_repeats,
                         "presets_interleaved": True, "complete": complete,
                         "quick": quick, "per_cell": per_cell, "dtype": str(dt).replace("torch.", ""),
                         "sparse_everywhere": sparse_everywhere, "warmup": warmup, "evals": list(evals),
                         "copy_options": copy_options, "recall_rows": recall_rows, "copy_yarn": copy_yarn,
                         "yarn_factor": factor, "context": ctx,
                         "model": EMBEDDED_NAME if model_spec == "embedded" else Path(model_spec).name},
            "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
        }

    if warmup is None:
        warmup = device.startswith("cuda")
    names = {p: stacks[p].name for p in presets}
    copied = {}

    def results(per_prompt, complete: bool) -> dict:
        out = summarise(per_prompt, peaks, names, meta(complete))
        if copied:
            out["copy"] = summarise_copy(copied, names, {k: v for k, v in settings.items() if k.startswith("copy")})
        return out

    peaks = dict.fromkeys(presets, 0)
    if copy_prompts:  # first: the measures that can rate stacks at every length
        def on_copy(records):
            copied.update(records)
            checkpoint(results({}, False))

        fit = None
        if copy_yarn == "per-length" and native:
            fit = functools.partial(fit_context, model)
        copied.update(run_copy(model, presets, stacks, copy_prompts, device=device, warmup=warmup,
                               recall_rows=recall_rows, progress=progress,
                               on_prompt=None if checkpoint is None else on_copy, fit=fit))
        if fit is not None:
            fit(ctx or native)  # back to the run's context for NIAH
    if not prompts:
        return results({}, True)
    longest = max(prompts, key=lambda p: p.n_tokens)
    warm: set = set()  # (preset, prompt tokens) pairs run once untimed
    per_prompt: dict[str, list] = {name: [] for name in presets}
    meters = {name: DensityMeter() for name in presets}
    bar = tqdm(total=len(presets) * len(prompts), desc="compare", disable=not progress, unit="prompt")
    for i, p in enumerate(prompts):
        budget = max_new_tokens or MAX_NEW_TOKENS[p.task]
        ids = p.input_ids.to(device)
        for name in presets[i % len(presets):] + presets[: i % len(presets)]:
            bar.set_postfix_str(f"{name} {p.task}@{p.n_tokens}")
            reps = base_repeats if name == "full" else repeats
            meter = meters[name]
            meter.reset()
            with patch(model, stacks[name], meter=meter):
                if warmup and (name, ids.shape[-1]) not in warm:  # per exact shape, see the docstring
                    with torch.no_grad():
                        model(ids, use_cache=False, logits_to_keep=1)
                    warm.add((name, ids.shape[-1]))
                if p is longest:  # peak memory of the longest real prefill (+ its short decode)
                    got = {}
                    peaks[name] = peak_memory(
                        lambda ids=ids, n=budget: got.update(r=_answer(model, tok, ids, n, reps, meter, p.answers)),
                        device)
                    text, prefill = got["r"]
                else:
                    text, prefill = _answer(model, tok, ids, budget, reps, meter, p.answers)
            per_prompt[name].append({"task": p.task, "length": p.length, "tokens": p.n_tokens, "depth": p.depth,
                                     "answers": list(p.answers), "output": text, "correct": score(text, p.answers),
                                     "prefill_s": prefill, "density": meter.mean()})
            bar.update(1)
        if checkpoint is not None and i + 1 < len(prompts):
            checkpoint(results(per_prompt, False))
    bar.close()
    return results(per_prompt, True)
