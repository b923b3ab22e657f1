"""Recipes, the plan, params files, verify and the model's fingerprint: each bad input is one
line naming the file or key, before DVC runs anything (the cases of a user's tour; the rest are
in test_check_params.py, test_e2e_dvc.py and test_cleandift.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import PARAMS, identity, make_encoded, store_model, tiny_model

from pipeline.cache.store import FeatureStore
from pipeline.cache.verify import remove, verify
from pipeline.core.errors import ConfigError, OutputError
from pipeline.core.fileio import MARKER
from pipeline.core.params import apply_recipe, load_params
from pipeline.diffusion.model import save_diffusion_model
from pipeline.plan.budget import plan

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_line(cmd: list[str], cwd: Path = ROOT) -> str:
    """A command that fails with exactly one line on stderr: that line."""
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture()
def recipes(tmp_path: Path) -> Path:
    """A copy of recipes/ (run.py with it) to add bad recipes to."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    for p in (ROOT / "recipes").iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    return folder


def run_recipe(recipes: Path, name: str, capsys, monkeypatch) -> str:
    """recipes/run.py --dry-run NAME, in this process, with `recipes` as its recipes folder:
    exit status 1 and one line on stderr; that line."""
    spec = importlib.util.spec_from_file_location("recipe_run", ROOT / "recipes" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RECIPES", recipes)
    monkeypatch.setattr(sys, "argv", ["run.py", "--dry-run", name])
    capsys.readouterr()
    assert module.main() == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_1_a_based_on_loop_is_one_line(recipes: Path, capsys, monkeypatch) -> None:
    (recipes / "a.yaml").write_text("based_on: b.yaml\ntrain: {iterations: 4}\n")
    (recipes / "b.yaml").write_text("based_on: a.yaml\n")
    line = run_recipe(recipes, "a", capsys, monkeypatch)
    assert "based_on loops (a.yaml -> b.yaml -> a.yaml)" in line
    plan_line = one_line(
        [sys.executable, "-m", "pipeline.plan", "--params", str(recipes / "a.yaml")]
    )
    assert "based_on loops" in plan_line


@pytest.mark.parametrize(
    "text,message",
    [
        ("based_on: missing.yaml\n", "based_on missing.yaml: no such recipe beside it"),
        ("train: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping of params groups"),
        ("train:\n  lr: 1\n  lr: 2\n", "duplicate key 'lr' at line 3"),
        ("based_on: ../params.yaml\n", "based_on '../params.yaml': a file name beside it"),
        (f"based_on: {ROOT / 'params.yaml'}\n", "a file name beside it, not a path"),
    ],
)
def test_2_7_8_a_recipe_that_cannot_load_is_one_line(
    recipes: Path, text: str, message: str, capsys, monkeypatch
) -> None:
    (recipes / "bad.yaml").write_text(text)
    assert message in run_recipe(recipes, "bad", capsys, monkeypatch)


def test_8_a_recipe_name_is_a_name_in_recipes(recipes: Path, capsys, monkeypatch) -> None:
    (recipes.parent / "params.yaml").write_text("seed: 0\n")  # what ../params would reach
    for name in ("../params", str(recipes.parent / "params")):
        line = run_recipe(recipes, name, capsys, monkeypatch)
        assert "no such recipe in recipes/" in line


def test_7_duplicate_keys_are_refused_by_every_reader_of_params(tmp_path: Path) -> None:
    """check_params, the plan and recipes/run.py read params through load_params, as DVC
    refuses the same file."""
    text = (ROOT / "params.yaml").read_text().replace("seed: 0", "seed: 0\nseed: 1", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        load_params(tmp_path / "params.yaml")
    line = one_line(
        [
            sys.executable,
            "stages/check_params.py",
            str(tmp_path / "ok"),
            "--params",
            str(tmp_path / "params.yaml"),
        ]
    )
    assert "duplicate key 'seed' at line" in line and not (tmp_path / "ok").exists()


@pytest.mark.parametrize(
    "images,message",
    [
        ("game=-5", "--images game=-5: expected DOMAIN=N with N a whole number >= 0"),
        ("unknown=3", "'unknown' is none of the domains"),
        ("=5", "'' is none of the domains"),
        ("game", "--images game: expected DOMAIN=N"),
    ],
)
def test_5_plan_images_are_known_domains_and_whole_numbers(images: str, message: str) -> None:
    assert message in one_line([sys.executable, "-m", "pipeline.plan", "--images", images])


def test_16_the_plan_counts_diffs_class_prompts_from_encoded_labels(tmp_path: Path) -> None:
    """Where the encoded labels hold the training set, the guided passes use their count of
    DIFF's five classes per draw; where not, the plan says it assumes two."""
    guided = apply_recipe(PARAMS, {"prompts": {"variants": ["plain", "guided"], "guided": "diff"}})
    assumed = plan(guided, root=tmp_path, count_flops=False)
    assert any(
        "2.00 of DIFF's 5 class prompts a training draw, assumed" in n for n in assumed.notes
    )
    model = store_model(tmp_path / "model")
    index = make_encoded(tmp_path / "data" / "encoded", model, 12)
    train = index[(index["set"] == "game") & (index["split"] == "train")]
    want = float(
        np.mean([sum(p[c] > 0 for c in (1, 3, 12, 14, 16)) for p in train["class_pixels"]])
    )
    counted = plan(guided, root=tmp_path, count_flops=False)
    note = next(n for n in counted.notes if "Guided passes" in n)
    assert f"{want:.2f} of DIFF's 5 class prompts a training draw, counted" in note
    assert counted.passes != assumed.passes


def test_11_verify_names_foreign_files_links_partials_and_leftover_temporaries(
    tmp_path: Path, capsys
) -> None:
    store = FeatureStore.create(
        tmp_path / "data/features/t50/game", identity(), 2, {"a": (2, 2, 2), "b": (2, 1, 1)},
        {"a": 8, "b": 16}, 2,
    )  # fmt: skip
    store.write_shard(
        0, {"a": np.zeros((2, 1, 2, 2, 2), np.float16), "b": np.ones((2, 1, 2, 1, 1), np.float16)}
    )
    root = store.path
    (root / "notes.txt").write_text("mine")
    (root / "features" / "link").symlink_to("/etc/hostname")
    (root / "done" / "c.0.partial").write_bytes(b"x")
    tmp = tmp_path / "data" / ".cleandift.abcd1234.tmp"
    tmp.mkdir()
    (tmp / MARKER).write_text("a stage's output being written\n")
    none = tmp_path / "none"  # no encoded index, no params: only what is there is checked
    assert verify([tmp_path / "data/features"], delete=True, encoded=none, params=none) == 4
    out = capsys.readouterr().out
    assert "notes.txt: not a file of this store" in out
    assert "link: a symbolic link (to /etc/hostname)" in out
    assert "c.0.partial: a killed writer's partial file" in out
    assert ".cleandift.abcd1234.tmp: a killed stage's temporary folder" in out
    # Only the pipeline's own are deleted: the partial file and the temporary folder.
    assert (root / "notes.txt").exists() and (root / "features" / "link").is_symlink()
    assert not (root / "done" / "c.0.partial").exists() and not tmp.exists()


def test_13_verify_deletes_files_only_inside_folders_the_pipeline_wrote(tmp_path: Path) -> None:
    foreign = tmp_path / "precious.safetensors"
    foreign.write_text("not the pipeline's")
    with pytest.raises(OutputError, match="not inside a folder this pipeline wrote"):
        remove(foreign)
    assert foreign.exists()
    store = FeatureStore.create(
        tmp_path / "s", identity(), 2, {"a": (2, 2, 2), "b": (2, 1, 1)}, {"a": 8, "b": 16}, 2
    )
    attrs = json.loads((store.path / "zarr.json").read_text())
    attrs["attributes"]["written_by"] = "someone else"
    (store.path / "zarr.json").write_text(json.dumps(attrs))
    done = json.loads((store.path / "done/zarr.json").read_text())
    done["attributes"]["written_by"] = "someone else"
    (store.path / "done/zarr.json").write_text(json.dumps(done))
    with pytest.raises(OutputError, match="not written by this pipeline"):
        FeatureStore.open(store.path, mode="r+").repair()


def test_12_identical_weights_give_an_identical_model_folder(tmp_path: Path) -> None:
    """fingerprint.json records sizes, not mtimes: a rebuild of the same weights is the same
    folder to DVC (its md5, its run-cache)."""
    for name in ("a", "b"):
        save_diffusion_model(tiny_model(), tmp_path / name)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_4_check_params_depends_on_params_yaml_s_text() -> None:
    """DVC compares params by value (50.0 == 50): check_params depends on the file too, so a
    value a stage would refuse meets the check first (the check refuses 50.0: test_check_params)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "params.yaml" in stages["check_params"]["deps"]
