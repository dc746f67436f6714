"""The measurement record keeps one naming scheme and an index in sync with it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _index_module():
    spec = importlib.util.spec_from_file_location("results_index", ROOT / "bench" / "results_index.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_run_folder_follows_the_scheme_and_the_index_is_current():
    mod = _index_module()
    assert mod.problems() == []
    assert (mod.RESULTS / "README.md").read_text() == mod.index(), "run: python bench/results_index.py"


def test_the_scheme_check_can_fail(tmp_path):
    mod = _index_module()
    (tmp_path / "compare-default-run3").mkdir()
    (tmp_path / "2026-12-07-h100-speed").mkdir()
    (tmp_path / "2026-12-07-h100-speed" / "README.md").write_text("# speed\n\n- Command: x\n")
    (tmp_path / "stray.md").write_text("")
    got = mod.problems(tmp_path)
    assert any("compare-default-run3/: not named" in p for p in got)
    assert any("no '- Commit:' line" in p for p in got) and any("no '- Machine:' line" in p for p in got)
    assert any("stray.md: a file outside" in p for p in got)
