"""The backend matrix and the fuzz campaign fail when a backend declines everything.

A backend that starts declining every call would otherwise show up as a row of skips (the matrix)
or as tests that return early and pass (the fuzz). Each test here runs the real suites in a
subprocess with one backend patched to decline every request, and expects them to fail saying so;
and runs them unpatched, where they pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
from attnzoo.ops import dispatch

_reasons = dispatch.Backend.reasons


def reasons(self, req, forced=False):
    if (self.op, self.name) == ("block_sparse", "blocked"):
        return ["declines everything (patched by tests/test_checks_cannot_pass_empty.py)"]
    return _reasons(self, req, forced)


dispatch.Backend.reasons = reasons
'''


def _pytest(tmp_path, patched: bool, *args) -> subprocess.CompletedProcess:
    (tmp_path / "decline_all.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ATTNZOO_FUZZ": "ci"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-p", "decline_all"] if patched else []),
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.mark.parametrize("patched", [False, True], ids=["as-is", "blocked-declines-everything"])
def test_backend_matrix_fails_when_a_backend_declines_everything(tmp_path, patched):
    run = _pytest(tmp_path, patched, "tests/test_ops_backends.py", "-k",
                  "block_sparse_backend_matches_reference and blocked and cpu and float32")
    if not patched:
        assert run.returncode == 0, run.stdout[-3000:]
        return
    assert run.returncode != 0, "the matrix passed with a backend that declined every call"
    assert "declined a call its declared capabilities cover" in run.stdout, run.stdout[-3000:]


@pytest.mark.parametrize("patched", [False, True], ids=["as-is", "blocked-declines-everything"])
def test_fuzz_fails_when_a_backend_declines_everything(tmp_path, patched):
    run = _pytest(tmp_path, patched, "tests/fuzz/test_ops_fuzz.py", "-k", "block_sparse_backend and blocked")
    if not patched:
        assert run.returncode == 0, run.stdout[-3000:]
        return
    assert run.returncode != 0, "the fuzz passed with a backend that declined every drawn case"
    assert "compared no case" in run.stdout, run.stdout[-3000:]
