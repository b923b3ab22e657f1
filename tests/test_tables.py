"""docs/tables.py: an experiment the export lacks is a visible "not run" row, never a
silently shorter table or a crash."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables(export: Path):
    spec = importlib.util.spec_from_file_location("tables", ROOT / "docs" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.EXPERIMENTS = export
    return module


@pytest.mark.parametrize("table", ["default_results", "crop_draws", "scaling"])
def test_a_missing_experiment_is_a_not_run_row_with_its_queue_command(table, tmp_path) -> None:
    export = json.loads((ROOT / "experiments/results.json").read_text())
    names = {"default_results": "pixels", "crop_draws": "crop-draws-k2", "scaling": "pixels"}
    gone = names[table]
    assert gone in export["experiments"]
    full = getattr(_tables(ROOT / "experiments/results.json"), table)()
    del export["experiments"][gone]
    (tmp_path / "experiments.json").write_text(json.dumps(export))
    cut = getattr(_tables(tmp_path / "experiments.json"), table)()
    assert len(cut.splitlines()) == len(full.splitlines())
    assert f"queue {gone}`" not in full
    row = next(ln for ln in cut.splitlines() if f"queue {gone}`" in ln)
    assert "not run on this code yet" in row
    assert row.count("|") == full.splitlines()[0].count("|")  # as many cells as the header
