"""Plugins: a selector in a separately installed package, found through the ``attnzoo.plugins``
entry-point group, is registered, run by the selector matrix and benchmarked with no edit to
tests/ or bench/.

The throwaway package is "installed" the way pip leaves one: a module and a ``.dist-info`` folder
with ``entry_points.txt`` on a sys.path entry (here PYTHONPATH of a subprocess), so the test needs
no network and no build backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

import attnzoo
from attnzoo.plans import BlockPlan, last_visible_block


@attnzoo.register("selector", "azplug_band")
@dataclass
class Band:
    """Keep the last ``width`` causal key blocks of every query block (a local band)."""
    block_size: int = 64
    width: int = 2
    plan_kind: ClassVar[str] = "block"
    small_config: ClassVar[dict] = {"block_size": 32}

    @torch.no_grad()
    def __call__(self, q, k, ctx=None):
        B, Nq, Nk, Hkv, b = q.shape[0], q.shape[2], k.shape[2], k.shape[1], self.block_size
        last = last_visible_block(Nq, Nk, b, b, q.device)
        cols = torch.arange(-(-Nk // b), device=q.device)
        keep = (cols <= last[:, None]) & (cols > last[:, None] - self.width)
        return BlockPlan.from_block_mask(keep.expand(B, Hkv, *keep.shape), b, b, Nq, Nk)
'''


def _install(site: Path, module: str, body: str, entry: str) -> None:
    (site / f"{module}.py").write_text(body)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[attnzoo.plugins]\n{entry}\n")


def _run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def site(tmp_path):
    _install(tmp_path, "azplug_band", PLUGIN, "band = azplug_band")
    return tmp_path


def test_a_plugin_selector_is_registered_and_listed(site):
    proc = _run(site, "-c", "import attnzoo; print(attnzoo.available('selector')); "
                            "print(attnzoo.registry.plugins())")
    assert proc.returncode == 0, proc.stderr
    assert "azplug_band" in proc.stdout and "'band = azplug_band': None" in proc.stdout
    info = _run(site, "-m", "attnzoo.cli", "info")
    assert "band = azplug_band: loaded" in info.stdout


def test_the_selector_matrix_and_the_benchmark_pick_a_plugin_up(site):
    proc = _run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_selector_matrix.py",
                "-k", "azplug_band")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "azplug_band" not in proc.stdout.split("passed")[-1]
    bench = _run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/test_selectors_bench.py",
                 "-k", "azplug_band and 4096")
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-2000:]
    assert " passed" in bench.stdout


def test_a_broken_plugin_is_reported_not_fatal(tmp_path):
    _install(tmp_path, "azplug_broken", "raise ImportError('needs a library that is not here')\n",
             "broken = azplug_broken")
    proc = _run(tmp_path, "-W", "always", "-c", "import attnzoo; print(attnzoo.available('selector')); "
                                                 "print(attnzoo.registry.plugins())")
    assert proc.returncode == 0, proc.stderr
    assert "xattention" in proc.stdout and "needs a library that is not here" in proc.stdout
    assert "plugin 'broken'" in proc.stderr
