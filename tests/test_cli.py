"""The command line as a new user meets it: run as a subprocess, a mistake prints one line on
stderr and exits with status 2 -- before any model loads (each case returns in seconds)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

# each case starts a Python process (~2 s): the quick loop (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow


def attnzoo(*args, timeout=120):
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "attnzoo.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - t


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and "Warning" not in x and not x.startswith("  ")]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    return lines[0]


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("default:\n  selector: {name: xattention\n  op: block_sparse\n")
    return path


@pytest.fixture
def unknown_selector_yaml(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("default:\n  selector: {name: xatention}\n  op: block_sparse\n")
    return path


CASES = {
    "unknown preset": (["compare", "--presets", "xatention"], "unknown preset 'xatention'"),
    "depth outside [0, 1]": (["compare", "--depths", "0.5,1.5"], "--depths"),
    "unknown task": (["compare", "--tasks", "single,needle"], "unknown task 'needle'"),
    "length past the context": (["compare", "--lengths", "100000"], "past the embedded model's context"),
    "length too short": (["compare", "--lengths", "100"], "at least 256 tokens"),
    "not a number": (["compare", "--lengths", "2k"], "comma-separated list of int"),
    "missing haystack": (["compare", "--haystack", "/no/such/file.txt"], "--haystack: no such file"),
    "missing stack file": (["compare", "--presets", "/no/such/stack.yaml"], "stack file not found"),
    "model folder that is not a model": (["train", "elastic", "--model", "/no/such/folder"], "--model"),
    "unknown command": (["comprae"], "invalid choice"),
    "no repeats": (["compare", "--repeats", "0"], "--repeats must be >= 1"),
    "no baseline repeats": (["compare", "--baseline-repeats", "0"], "--baseline-repeats must be >= 1"),
    "unknown device": (["compare", "--device", "tpu"], "--device: device must be"),
    "context too small": (["compare", "--context", "10"], "--context must lie in"),
    "length past --context": (["compare", "--context", "16384", "--lengths", "20000"], "--context 20000 extends it"),
    "compare model that is missing": (["compare", "--model", "/no/such/model"], "--model: no such file or folder"),
    "unknown dtype": (["compare", "--dtype", "fp8"], "invalid choice"),
    "unknown eval": (["compare", "--evals", "niah,kopy"], "--evals: expected a comma-separated subset"),
    "prime as long as the segment": (["compare", "--segment-len", "16", "--prime", "16"], "must be shorter"),
    "copy prompt too short": (["compare", "--copy-lengths", "300"], "copy settings: a copy prompt"),
    "copy length past one context": (["compare", "--evals", "copy", "--copy-yarn", "run", "--copy-lengths", "20000"],
                                     "--context 20000 extends it"),
    "no copy prompts per cell": (["compare", "--copy-per-cell", "0"], "--copy-per-cell must be >= 1"),
    "copy share outside [0, 1]": (["train", "elastic", "--copy-share", "1.5"], "--copy-share must lie in"),
    "resume for ssa": (["train", "ssa", "--resume", "checkpoint.pt"], "are for elastic router training"),
    "missing checkpoint": (["train", "elastic", "--resume", "/no/such/checkpoint.pt"], "--resume: no such checkpoint"),
    "micro-batches for ssa": (["train", "ssa", "--micro-batch-tokens", "4096"], "are for elastic router training"),
    "no micro-batch tokens": (["train", "elastic", "--micro-batch-tokens", "0"], "--micro-batch-tokens must be >= 1"),
    "train on an unknown device": (["train", "elastic", "--device", "tpu"], "--device: device must be"),
    "train context too small": (["train", "elastic", "--context", "10"], "--context must lie in"),
    "train length past the context": (["train", "elastic", "--lengths", "16384"], "--context 16384 extends it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_exit_2(case):
    args, needle = CASES[case]
    proc, seconds = attnzoo(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in _one_line(proc.stderr)
    assert "Traceback" not in proc.stderr and seconds < 60  # nothing was loaded


def test_invalid_yaml_names_the_file_and_line(bad_yaml):
    proc, _ = attnzoo("compare", "--presets", str(bad_yaml))
    line = _one_line(proc.stderr)
    assert proc.returncode == 2 and str(bad_yaml) in line and "line 3" in line


def test_unknown_component_in_a_stack_file(unknown_selector_yaml):
    proc, _ = attnzoo("compare", "--presets", str(unknown_selector_yaml))
    assert proc.returncode == 2 and "did you mean 'xattention'" in _one_line(proc.stderr)


def test_short_haystack_is_refused(tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("too short")
    proc, _ = attnzoo("compare", "--haystack", str(path))
    assert proc.returncode == 2 and "holds 9 characters" in _one_line(proc.stderr)


def test_version_and_help_name_every_command():
    proc, _ = attnzoo("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("attnzoo ")
    proc, _ = attnzoo("--help")
    assert proc.returncode == 0 and all(cmd in proc.stdout for cmd in ("info", "compare", "calibrate", "train"))


def test_an_earlier_runs_results_are_not_overwritten_silently(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    proc, seconds = attnzoo("compare", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 2 and "holds an earlier run's results; pass --overwrite" in _one_line(proc.stderr)
    assert seconds < 60 and (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.parametrize("args,message", [
    (["--preset", "streaming"], "nothing in it is model-specific"),
    (["--preset", "elastic-fa-xa"], "attnzoo train elastic --model MODEL"),
    (["--preset", "router-table-example"], "hand-written per-KV-head table"),
    (["--preset", "xatention-calibrated"], "unknown 'xatention-calibrated' (did you mean"),
    (["--preset", "xattention-calibrated", "--out", "x.txt"], "--out must name a .yaml file"),
    (["--preset", "xattention-calibrated", "--target-recall", "0.9,0.8"], "need --max-density"),
    (["--preset", "xattention-calibrated", "--dense-layers", "first:x"], "--dense-layers: layer key"),
    (["--preset", "xattention-calibrated", "--density-budget", "1.5"], "--density-budget must lie in (0, 1]"),
    (["--preset", "token-sparse-calibrated", "--density-budget", "0.3"], "--preset token-sparse-calibrated has none"),
    (["--preset", "token-sparse-calibrated", "--target-recall", "0.9,0.8"], "fits one coverage to one recall"),
    (["--preset", "xattention-calibrated", "--density-budget", "0.3", "--target-recall", "0.9,0.8"],
     "drop --target-recall / --max-density"),
])
def test_calibrate_mistakes_are_one_line(args, message):
    proc, seconds = attnzoo("calibrate", *(args if "--out" in args else [*args, "--out", "never.yaml"]))
    assert proc.returncode == 2 and message in _one_line(proc.stderr), proc.stderr
    assert seconds < 60


def test_resume_from_another_runs_checkpoint_is_refused_before_loading(tmp_path):
    import torch

    path = tmp_path / "checkpoint.pt"
    torch.save({"run": {"steps": 300, "batch": 16, "seed": 100, "n_samples": 64}}, path)
    proc, seconds = attnzoo("train", "elastic", "--resume", str(path), "--steps", "100", "--batch", "16")
    assert proc.returncode == 2, proc.stderr
    assert "is a checkpoint of a run with" in _one_line(proc.stderr) and "'steps': 100" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 60


def test_the_default_out_folder_is_numbered_on_instead_of_overwritten(tmp_path, monkeypatch, capsys):
    """The quick start's compare, then the README's own-model compare: the second run must neither
    replace the first's results nor fail."""
    import argparse

    from attnzoo.cli import DEFAULT_OUT, _fresh_out

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(out=DEFAULT_OUT, overwrite=False)
    assert _fresh_out(args) == DEFAULT_OUT  # nothing there yet
    for folder in (DEFAULT_OUT, f"{DEFAULT_OUT}-2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text("{}")
    assert _fresh_out(args) == f"{DEFAULT_OUT}-3" and "this run writes attnzoo-compare-3/" in capsys.readouterr().out
    assert _fresh_out(argparse.Namespace(out=DEFAULT_OUT, overwrite=True)) == DEFAULT_OUT
