"""Recipes: each applies onto params.yaml into valid params; the default changes nothing; a
machine without the data or the model gets one clear error naming the missing folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PARAMS
from test_params import stage_reads

from pipeline.core.errors import DataError, ModelError
from pipeline.core.params import apply_recipe, load_params, read_group, read_timesteps
from pipeline.data.datasets import DataConfig
from pipeline.diffusion.build import ModelConfig, build_model_folder
from pipeline.diffusion.prompts import PromptConfig, variant_prompts
from pipeline.loops import prepare
from pipeline.loops.invert import InvertConfig
from pipeline.plan.recipes import absolute_roots, overrides

ROOT = Path(__file__).resolve().parents[1]

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def recipe(name: str) -> dict:
    return apply_recipe(PARAMS, load_params(ROOT / "recipes" / f"{name}.yaml"))


def test_the_papers_and_the_default_are_recipes() -> None:
    assert {"default", "benchmark", "diff-gta2cs", "ptdiffseg-cs2dz"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_gives_valid_params(name: str) -> None:
    params = recipe(name)
    for key, cls in stage_reads().items():
        if key == "timesteps":
            read_timesteps(params)
        else:
            read_group(params, key, cls)


def test_the_default_recipe_is_params_yaml() -> None:
    assert recipe("default") == PARAMS


def test_diffs_timesteps_are_its_save_timesteps_on_its_schedule() -> None:
    params = recipe("diff-gta2cs")
    steps = read_group(params, "invert", InvertConfig).inversion().unet_timesteps()
    assert [steps[i] for i in [33, 29, 25, 22, 18, 14, 11, 7, 3]] == params["timesteps"]
    texts = variant_prompts(read_group(params, "prompts", PromptConfig))
    assert texts == {"plain": "", "guided": "<guided-diff>"}
    assert set(params["data"]["targets"]) == {"cityscapes", "acdc", "darkzurich"}  # whole


def test_diff_trains_on_crop_draws_of_all_of_gta() -> None:
    """DIFF crops 512x512 before its UNet (uda_gtaCAug_to_cityscapes_512x512.py:13-24) and
    trains on every GTA image (DGDataset, Cityscapes val its validation)."""
    params = recipe("diff-gta2cs")
    assert params["encode"]["crop"] == [512, 512] and params["encode"]["draws"] == 2
    assert params["sampling"]["feature_crop"] is None  # read whole
    assert params["data"]["source"]["val_fraction"] == 0.0
    train, sampling = params["train"], params["sampling"]
    assert (sampling["cat_max_ratio"], sampling["flip"], sampling["rcs_min_pixels"]) == (
        0.75,
        True,
        3000,
    )
    assert (train["grad_clip"], train["ce_average"], train["precision"]) == (5.0, "all", "fp32")
    data = read_group(params, "data", DataConfig)
    assert data.source.val_fraction == 0.0


def test_gong_et_al_train_without_augmentation_or_rare_class_sampling() -> None:
    """Their abstract: "without ... augmentation, or rare-class sampling"."""
    params = recipe("ptdiffseg-cs2dz")
    sampling, encode = params["sampling"], params["encode"]
    assert not sampling["rare_class_sampling"] and not sampling["flip"]
    assert sampling["feature_crop"] is None
    assert encode["crop"] is None and not encode["photometric"] and encode["draws"] == 1


def test_gong_et_al_randomize_scene_prompts_with_category_tokens() -> None:
    params = recipe("ptdiffseg-cs2dz")
    texts = variant_prompts(read_group(params, "prompts", PromptConfig))
    assert texts["scene+category"] == "a photo of a city street<+category>"
    assert params["train"]["train_variants"] == list(texts)
    assert params["train"]["consistency_weight"] > 0 and params["tune_prompt"]["steps"] > 0


@pytest.mark.parametrize("name", ["diff-gta2cs", "ptdiffseg-cs2dz"])
def test_missing_data_and_model_are_one_clear_error(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a machine without data/external
    params = recipe(name)
    data = read_group(params, "data", DataConfig)
    with pytest.raises(DataError, match=r"data/external/\w+: dataset root not found"):
        prepare.run(data, "datasets", "manifests", "freq.png")
    assert not Path("manifests").exists()
    model = read_group(
        {"model": {**params["model"], "device": "cpu", "dtype": "fp32"}}, "model", ModelConfig
    )
    with pytest.raises(
        ModelError, match="data/external/stable-diffusion-2-1: no such model folder"
    ):
        build_model_folder(model, 0, "model_init")


def test_runner_dry_run_and_unknown_names() -> None:
    """--dry-run prints the merged params (roots of real data made absolute: the experiment
    runs outside the workspace) and the problems a real run would stop on, exit 1."""
    out = subprocess.run(
        [sys.executable, "recipes/run.py", "diff-gta2cs", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert yaml.safe_load(out.stdout) == absolute_roots(recipe("diff-gta2cs"), ROOT)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert f"data.source (gta5) root {ROOT}/data/external/gta5" in out.stderr
    ok = subprocess.run(
        [sys.executable, "recipes/run.py", "default", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout) == PARAMS
    bad = subprocess.run(
        [sys.executable, "recipes/run.py", "difff"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "no such recipe" in bad.stderr


@pytest.mark.parametrize("name", RECIPES)
def test_the_overrides_make_dvc_s_params_the_recipe_s(name: str, tmp_path: Path) -> None:
    """recipes/run.py hands the recipe to `dvc exp run -S`: DVC's own override code applied
    to params.yaml gives exactly the merged params (absolute roots included), so the run never
    needs to write the workspace's params.yaml."""
    from dvc.utils.hydra import apply_overrides

    merged = absolute_roots(recipe(name), ROOT)
    params = tmp_path / "params.yaml"
    params.write_bytes((ROOT / "params.yaml").read_bytes())
    sets = overrides(PARAMS, merged)
    if sets:
        apply_overrides(params, sets)
    assert load_params(params) == merged
