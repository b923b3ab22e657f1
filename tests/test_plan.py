"""The budget before a run (pipeline/plan): store bytes as extract writes them, DIFF's recipe at
GTA scale against what the rehearsal measured, DVC's link type on this filesystem, and the
refusal when the outputs cannot fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PARAMS, config, extract, make_encoded, shard_mb, store_model

from pipeline.cache.store import METADATA_BYTES, FeatureStore, StoreLayout
from pipeline.core.errors import ConfigError
from pipeline.core.params import apply_recipe, load_params
from pipeline.loops.extract import ExtractConfig
from pipeline.plan.budget import Budget, Row, dvc_cache_type, dvc_fit, link_type, plan

ROOT = Path(__file__).resolve().parents[1]
GTA = {"gta5": 24966, "cityscapes": 500, "acdc": 406, "darkzurich": 50}


@pytest.mark.parametrize("storage", ["fp16", "int8", "pca-4", "pca-4-int8"])
def test_store_bytes_are_what_extract_writes(tmp_path: Path, storage: str) -> None:
    """Every data file to the byte; the metadata within METADATA_BYTES a file on average."""
    model = store_model(tmp_path / "model")
    make_encoded(tmp_path / "enc", model, 12, prompts=("", "a street"))
    mb = shard_mb(3, model, storage=storage, variants=2)
    cfg = config("extract", ExtractConfig, batch_size=4, shard_mb=mb, storage=storage)
    extract(model, tmp_path / "enc", 50, tmp_path / "s", cfg)
    store = FeatureStore.open(tmp_path / "s")
    assert store.images_per_shard == 3 and store.n_shards == 3  # game: 8 images, 3 a shard
    info = {t: store.tap_info[t] for t in store.taps}
    shapes = {t: (a["model_channels"], a["height"], a["width"]) for t, a in info.items()}
    strides = {t: a["stride"] for t, a in info.items()}
    layout = StoreLayout.of(store.n_images, store.identity.n_variants, shapes, strides, storage, 3)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    meta = [p for p in files if p.name == "zarr.json"]
    data = sum(p.stat().st_size for p in files) - sum(p.stat().st_size for p in meta)
    assert layout.bytes() - METADATA_BYTES * len(meta) == data
    # The files the plan counts (what DVC pays for one by one) are exactly those on disk.
    assert sorted(layout.files()) == sorted(str(p.relative_to(tmp_path / "s")) for p in files)
    assert abs(sum(p.stat().st_size for p in meta) / len(meta) - METADATA_BYTES) < 200


def test_diffs_recipe_at_gta_scale_is_the_rehearsal_s_bytes_per_draw() -> None:
    """25 TB: GTA5 x 2 crop draws x 2 views x 9 timesteps of 512x512 fp16 features, each draw's
    bytes those the rehearsal measured on the SD-2.1 architecture (rehearsal.json)."""
    rehearsal = json.loads((ROOT / "benchmarks/results/rehearsal.json").read_text())
    per_view = rehearsal["checks"]["crop_stores"]["at_512x512"]["bytes_per_draw_all_timesteps"]
    recipe = apply_recipe(PARAMS, load_params(ROOT / "recipes/diff-gta2cs.yaml"))
    budget = plan(apply_recipe(recipe, {"extract": {"storage": "fp16"}}), GTA, count_flops=False)
    by = {(r.stage, r.what.split(":")[0]): r for r in budget.rows}
    crops = by["extract@t x 9", "gta5-crops"]
    assert crops.passes == 24966 * 2 * 9 * 4
    assert crops.bytes == pytest.approx(24966 * 2 * 2 * per_view, rel=0.001)
    assert 25e12 < crops.bytes < 25.5e12
    assert by["invert", "gta5-crops"].passes == 24966 * 2 * (33 + 33 * 3)
    # The recipe's own storage (64 principal components per tap, int8): stores under 2 TB.
    stores = plan(recipe, GTA, count_flops=False).rows
    assert 1.9e12 < sum(r.bytes for r in stores if r.stage.startswith("extract")) < 2e12


def test_dvc_cache_type_and_the_link_this_filesystem_takes(tmp_path: Path) -> None:
    assert dvc_cache_type(ROOT) == "reflink,hardlink,copy"
    (tmp_path / ".dvc").mkdir()
    assert dvc_cache_type(tmp_path) == "reflink,copy"  # DVC's default
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    remote = x\n[cache]\n    type = hardlink\n"
    )
    assert dvc_cache_type(tmp_path) == "hardlink"
    assert link_type("hardlink,copy", tmp_path) == "hardlink"
    (tmp_path / "a").write_text("x")
    cp = subprocess.run(["cp", "--reflink=always", tmp_path / "a", tmp_path / "b"])
    assert link_type("reflink,copy", tmp_path) == ("reflink" if cp.returncode == 0 else "copy")


def test_a_run_that_cannot_fit_is_refused_and_outputs_here_count(tmp_path: Path) -> None:
    rows = [Row("extract@t x 1", "game", 10, 1, 10, 600)]
    copy = Budget(rows, "copy", "copy", 1000, tmp_path, None)
    with pytest.raises(ConfigError, match=r"the run needs 1.2 KB more disk \(600 B of outputs"):
        copy.check_fits()
    Budget(rows, "copy", "copy", 1000, tmp_path, None, existing_bytes=200).check_fits()
    Budget(rows, "hardlink", "hardlink", 1000, tmp_path, None).check_fits()


def test_the_plan_command_prints_the_default_s_budget(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pipeline.plan"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| extract@t x 2 | game: 1 variants, 480 images a shard | 480 | 1 | 960 |" in proc.stdout
    assert "DVC cache: cache.type reflink,hardlink,copy" in proc.stdout


def test_the_clean_recipe_is_diffs_with_one_clean_store_and_no_inversion() -> None:
    """recipes/cleandift-gta2cs.yaml is based_on DIFF's: its data, draws and head; 4 passes a
    draw (plain, and the guided view's "" and class prompts) where DIFF's inversion runs 132."""
    diff = apply_recipe(PARAMS, load_params(ROOT / "recipes/diff-gta2cs.yaml"))
    clean = apply_recipe(PARAMS, load_params(ROOT / "recipes/cleandift-gta2cs.yaml"))
    assert clean["train"] == diff["train"] and clean["data"] == diff["data"]
    assert clean["encode"] == diff["encode"] and clean["timesteps"] == [261]
    by = {r.stage: r for r in plan(clean, GTA, count_flops=False).rows if "gta5-crops" in r.what}
    assert set(by) == {"encode", "extract@t x 1"}  # no invert row: noise_mode clean
    assert by["extract@t x 1"].passes == 24966 * 2 * 4


def test_the_cleandift_stage_is_budgeted(tmp_path: Path) -> None:
    """Per step: the teacher at `bins` timesteps and the student forward and backward."""
    params = apply_recipe(PARAMS, {"cleandift": {"steps": 10, "batch_size": 4}})
    rows = [r for r in plan(params, count_flops=False).rows if r.stage == "cleandift"]
    assert len(rows) == 1 and rows[0].passes == 10 * 4 * (3 + 3)
    assert rows[0].bytes > 0


def test_a_recipe_based_on_another_is_applied_over_it(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train: {iterations: 5, lr: 0.1}\ntimesteps: [3]\n")
    (tmp_path / "own.yaml").write_text("based_on: base.yaml\ntrain: {lr: 0.2}\n")
    assert load_params(tmp_path / "own.yaml") == {
        "train": {"iterations": 5, "lr": 0.2},
        "timesteps": [3],
    }
    (tmp_path / "bad.yaml").write_text("based_on: nothing.yaml\n")
    with pytest.raises(ConfigError, match="based_on nothing.yaml: no such recipe beside it"):
        load_params(tmp_path / "bad.yaml")


def test_diffs_recipe_at_gta_scale_keeps_its_stores_within_20k_files() -> None:
    """The plan counts every file of the stores (what DVC pays per file for): DIFF's recipe at
    GTA scale in a few thousand files of about shard_mb each, where one image per tap and
    array per 16 images made 633,501."""
    params = apply_recipe(PARAMS, load_params(ROOT / "recipes/diff-gta2cs.yaml"))
    budget = plan(params, GTA, count_flops=False)
    stores = sum(len(f) for k, f in budget.store_files.items() if k.startswith("features/"))
    assert stores <= 20_000
    assert budget.files == sum(len(f) for f in budget.store_files.values())
    extract = [r for r in budget.rows if r.stage.startswith("extract")]
    assert sum(r.files for r in extract) == stores
    shard_mb = params["extract"]["shard_mb"]
    gta = next(r for r in extract if "gta5-crops" in r.what)
    ips = int(gta.what.split(", ")[1].split()[0].replace(",", ""))
    per_image = gta.bytes / 9 / 24966
    assert shard_mb * 1e6 * 0.9 <= ips * per_image <= shard_mb * 1e6  # about shard_mb each


def test_the_plan_prints_dvc_s_own_seconds_from_the_committed_fit(tmp_path: Path) -> None:
    """seconds = intercept + slope x files, per command, from benchmarks/dvc_scale.py's fit."""
    fit = {"status": {"intercept_s": 1.5, "per_1000_files_s": 0.25}}
    (tmp_path / "dvc_scale.json").write_text(json.dumps({"fit": fit}))
    assert dvc_fit(tmp_path / "dvc_scale.json") == fit and dvc_fit(tmp_path / "none.json") == {}
    rows = [Row("extract@50", "game", 10, 1, 10, 100, files=20_000)]
    budget = Budget(rows, "copy", "copy", 10**12, tmp_path, None, dvc_fit=fit)
    assert budget.dvc_seconds() == {"status": 1.5 + 0.25 * 20}
    assert "DVC's own time at 20,000 files" in budget.table() and "dvc status 6 s" in budget.table()
    assert "DVC's own time" not in Budget(rows, "copy", "copy", 10**12, tmp_path, None).table()
