"""``attnzoo.settings``: every switch in one table, read from one module, overridable per thread."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from attnzoo import settings

ROOT = Path(__file__).resolve().parents[1]


def _sources():
    for folder in ("attnzoo", "bench", "tests"):
        yield from (ROOT / folder).rglob("*.py")


def test_every_variable_is_read_through_settings_only():
    """No module but attnzoo/settings.py reads an ATTNZOO_* variable (or TRITON_INTERPRET) from the
    environment, and every ATTNZOO_* name the code mentions is a setting's variable."""
    known = {s.env for s in settings.SETTINGS.values()}
    read = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\()\s*["'](ATTNZOO_\w+|TRITON_INTERPRET)""")
    offenders, unknown = [], set()
    for path in _sources():
        text = path.read_text()
        if path not in (ROOT / "attnzoo" / "settings.py", Path(__file__).resolve()) and read.search(text):
            offenders.append(str(path.relative_to(ROOT)))
        unknown |= set(re.findall(r"\bATTNZOO_[A-Z_]+\b", text)) - known
    assert not offenders, f"read the environment directly instead of attnzoo.settings: {offenders}"
    assert not unknown, f"ATTNZOO_* names with no setting: {sorted(unknown)}"


def test_readme_table_is_generated_from_the_settings():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert block, "README.md lost its settings table markers"
    assert block.group(1).strip() == settings.markdown().strip(), (
        "README's settings table is out of date: paste `attnzoo info --settings-markdown` between the markers")


def test_value_comes_from_override_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("ATTNZOO_MAX_HEAD_RUNS", raising=False)
    assert settings.get("max_head_runs") == 4
    monkeypatch.setenv("ATTNZOO_MAX_HEAD_RUNS", "7")
    assert settings.get("max_head_runs") == 7
    with settings.override(max_head_runs=2):
        assert settings.get("max_head_runs") == 2
        with settings.override(max_head_runs="3"):  # text is parsed as the variable's would be
            assert settings.get("max_head_runs") == 3
        assert settings.get("max_head_runs") == 2
        row = next(r for r in settings.rows() if r["name"] == "max_head_runs")
        assert (row["value"], row["source"]) == ("2", "override")
    assert settings.get("max_head_runs") == 7


def test_bad_values_name_the_variable_and_what_it_takes(monkeypatch):
    monkeypatch.setenv("ATTNZOO_CHECK_VALUES", "sometimes")
    with pytest.raises(ValueError, match=r"ATTNZOO_CHECK_VALUES='sometimes': expected 1 or 0"):
        settings.value_checks("cpu")
    monkeypatch.setenv("ATTNZOO_FLEX_MIN_LEN", "many")
    with pytest.raises(ValueError, match="ATTNZOO_FLEX_MIN_LEN='many': expected a positive whole number"):
        settings.get("flex_min_len")
    row = next(r for r in settings.rows() if r["name"] == "flex_min_len")  # attnzoo info shows it, not crash
    assert row["value"].startswith("invalid (ATTNZOO_FLEX_MIN_LEN='many'")
    with pytest.raises(ValueError, match="unknown setting 'chek_values'"):
        settings.get("chek_values")
    with pytest.raises(ValueError, match="expected one of fa2, fa3, auto"):
        with settings.override(flashinfer_backend="fa4"):
            pass


def test_override_is_local_to_its_thread():
    """Two threads (a server's workers) see only their own overrides."""
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name, value):
        with settings.override(max_head_runs=value):
            barrier.wait()  # both overrides active at once
            seen[name] = settings.get("max_head_runs")
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n, v)) for n, v in (("a", 1), ("b", 9))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": 1, "b": 9}
    assert settings.get("max_head_runs") == 4


def test_check_values_does_not_change_the_flex_density_limits(monkeypatch):
    """Switches do not change each other's meaning: with flex opted in on the CPU, a dense plan is
    declined by flex's density limit whether value checks are on or off (it was not, with them off;
    test_dispatch checks the same through ops.block_sparse)."""
    from attnzoo.ops import dispatch
    from attnzoo.ops.dispatch import make_request
    from attnzoo.plans import BlockPlan

    q = torch.randn(1, 2, 4096, 64)
    plan = BlockPlan.full(1, 2, 4096, 4096, 64, 64)
    for checks in (True, False):
        with settings.override(flex_min_len=1024, check_values=checks):
            req = make_request("block_sparse", q, q, q, "block", return_lse=False, key_padding_mask=None,
                               causal=True, plan_heads=2, plan_density=float(plan.density()), block_size=(64, 64))
            assert "density" in (dict(dispatch.explain(req))["flex"] or ""), checks


def test_info_prints_every_setting():
    out = subprocess.run([sys.executable, "-m", "attnzoo.cli", "info"], capture_output=True, text=True,
                         timeout=120, env={"ATTNZOO_MAX_HEAD_RUNS": "6", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for name in settings.SETTINGS:
        assert name in out.stdout
    assert re.search(r"max_head_runs\s+6\s+environment\s+ATTNZOO_MAX_HEAD_RUNS", out.stdout)
    table = subprocess.run([sys.executable, "-m", "attnzoo.cli", "info", "--settings-markdown"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert table.stdout.strip() == settings.markdown().strip()
