"""The fuzz campaign's profiles, case counter and report.

``ATTNZOO_FUZZ`` picks the hypothesis profile: ``ci`` (default: a few examples per target, seconds
in CI), ``long`` (the CPU campaign: >= 10,000 cases across every target) or ``gpu`` (the campaign on
a CUDA device: every CUDA backend forced in turn, head dims up to 128, longer sequences). Every
check calls ``count(target)``; a test that counted nothing fails (every drawn case declined: it
checked nothing, and would otherwise pass). At the end of the session the counts, the mismatches
(failed tests), the time and the hypothesis seed are printed, and written as markdown to
``ATTNZOO_FUZZ_REPORT`` if set:

    ATTNZOO_FUZZ=long ATTNZOO_FUZZ_REPORT=bench/results/<date>-cpu-fuzz/README.md \\
        python -m pytest tests/fuzz -q --hypothesis-seed=20261124

The report names the command that ran (this session's pytest arguments) and the commit.
"""

from __future__ import annotations

import collections
import os
import platform
import time

import pytest
import torch
from hypothesis import HealthCheck, settings

from attnzoo import settings as attnzoo_settings

PROFILE = attnzoo_settings.get("fuzz_profile")

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                      HealthCheck.data_too_large])
settings.register_profile("attnzoo-ci", max_examples=10, **_COMMON)
settings.register_profile("attnzoo-long", max_examples=100, **_COMMON)
settings.register_profile("attnzoo-gpu", max_examples=100, **_COMMON)
settings.load_profile(f"attnzoo-{PROFILE}")
DEVICE = "cuda" if PROFILE == "gpu" else "cpu"

COUNTS: collections.Counter = collections.Counter()  # cases checked per target
DECLINED: collections.Counter = collections.Counter()  # drawn cases a forced backend declined
_T0 = time.time()


def examples(ci: int, long: int, gpu: int | None = None) -> settings:
    """Per-target example budget for the active profile (``gpu`` defaults to ``long``)."""
    return settings(max_examples={"ci": ci, "long": long, "gpu": long if gpu is None else gpu}[PROFILE])


# the Triton interpreter runs ~ms per tile: those targets stop checking after this many cases in the
# long profile (hypothesis keeps drawing; the cheap draws are not counted)
SLOW_CAP = {"triton": 80}


def capped(target: str, backend_name: str) -> bool:
    cap = SLOW_CAP.get(backend_name)
    return PROFILE == "long" and DEVICE == "cpu" and cap is not None and COUNTS[target] >= cap


def count(target: str) -> None:
    COUNTS[target] += 1


def declined(target: str) -> None:
    DECLINED[target] += 1


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="ATTNZOO_FUZZ=gpu needs a CUDA device")
        for item in items:
            if "fuzz" in item.nodeid:
                item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A fuzz test that compared no case fails: hypothesis drew cases, the backend declined (or the
    cap stopped) every one, and the test would otherwise pass having checked nothing."""
    before, declined_before = sum(COUNTS.values()), sum(DECLINED.values())
    result = yield
    if sum(COUNTS.values()) == before:
        raise AssertionError(f"{item.nodeid} compared no case: {sum(DECLINED.values()) - declined_before} drawn "
                             "cases were declined by the backend it forces. A check that compares nothing cannot "
                             "pass: widen what it draws, or stop forcing a backend that cannot take these calls")
    return result


def _command(session) -> str:
    """The command that ran: the fuzz environment variables and pytest's own arguments."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATTNZOO_FUZZ", "ATTNZOO_FUZZ_REPORT") if k in os.environ)
    args = " ".join(session.config.invocation_params.args)
    return f"{env} python -m pytest {args}".strip()


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(__file__))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(__file__)).stdout.strip()
        return f"`{out.stdout.strip()}`" + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 \
            else "unknown (not a git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def pytest_sessionfinish(session, exitstatus):
    if not COUNTS:
        return
    failed = session.testsfailed
    seed = session.config.getoption("hypothesis_seed", default=None)
    lines = [
        f"# Fuzz campaign ({PROFILE} profile)",
        "",
        f"- cases checked: **{sum(COUNTS.values()):,}**, mismatching tests: **{failed}**"
        f" (a mismatch fails its test; hypothesis shrinks it and prints the reproducer)",
        f"- time: {time.time() - _T0:.0f} s, hypothesis seed: {seed if seed is not None else 'random'}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if DEVICE == "cuda" else ""),
        f"- Command: `{_command(session)}`",
        f"- Commit: {_commit()}",
        "",
        "| target | cases checked | declined by the forced backend |",
        "|---|---|---|",
    ]
    for target in sorted(set(COUNTS) | set(DECLINED)):
        lines.append(f"| {target} | {COUNTS[target]:,} | {DECLINED[target]:,} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    path = attnzoo_settings.get("fuzz_report")
    if path:
        with open(path, "w") as f:
            f.write(text)
