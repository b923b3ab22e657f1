"""UNet passes per draw of DIFF's recipe, counted on the real invert and extract loops (DIFF's
37-step schedule, its nine timesteps, plain and guided views, two class prompts in the crop),
and the trajectories they store: the same as before the passes were cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from diffusers import UNet2DConditionModel
from helpers import (
    PARAMS,
    RESOLUTION,
    STORE_MODEL,
    config,
    make_encoded,
    params,
    shard_mb,
    tiny_model,
)

from pipeline.cache.encoded import LABELS_NAME, read_prompts
from pipeline.core.names import GUIDED_DIFF_PROMPT
from pipeline.core.params import apply_recipe, load_params, read_group
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.inversion import invert, invert_guided, passes
from pipeline.diffusion.model import load_diffusion_model
from pipeline.diffusion.unet_features import prompt_contexts, variant_passes
from pipeline.loops import extract
from pipeline.loops.invert import InvertConfig, invert_set
from pipeline.plan.budget import plan

ROOT = Path(__file__).resolve().parents[1]
RECIPE = load_params(ROOT / "recipes" / "diff-gta2cs.yaml")
NINE = RECIPE["timesteps"]  # [91, 52, 30, 22, 18, 14, 11, 7, 3]
SIDEWALK, RIDER = 1, 12  # two of DIFF's five class prompts

# Per draw before this change (benchmarks/results/cost.json at bb04810): 37 plain inversion
# passes, 37 x 4 guided ("" twice, two classes), 9 x 4 extraction passes: 221. Now the
# inversion ends at DIFF's largest saved step (t = 91: 34 steps, 33 updates) and runs "" once:
# 33 + 33 x 3, and the same 9 x 4 extraction passes: 168.


class Rows:
    """UNet rows run (a call of batch B is B passes), for calls on the latents' grid only
    (resolve_taps' probe runs on a square grid of its own)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, width: int) -> None:
        self.n, forward = 0, UNet2DConditionModel.forward

        def counted(unet, sample, *args, **kwargs):
            if sample.shape[-1] == width:
                self.n += int(sample.shape[0])
            return forward(unet, sample, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", counted)


@pytest.fixture(scope="module")
def recipe_project(tmp_path_factory) -> Path:
    """A tiny model, two source training images and one target image, encoded with DIFF's
    variants; each source label holds road, a sidewalk and a rider."""
    root = tmp_path_factory.mktemp("passes")
    model = tiny_model(root / "model", prediction_type="epsilon", **STORE_MODEL)  # 32x64 ok
    make_encoded(root / "encoded", model, 3, ("", GUIDED_DIFF_PROMPT), names=("plain", "guided"))
    labels = zarr.open_array(root / "encoded" / "game" / LABELS_NAME, mode="r+")
    label = np.zeros(labels.shape[1:], np.uint8)
    label[:, : label.shape[1] // 2] = SIDEWALK
    label[label.shape[0] // 2 :, -8:] = RIDER
    labels[:] = np.stack([label] * labels.shape[0])
    return root


def _invert_cfg(**over) -> InvertConfig:
    return read_group(params(invert={**RECIPE["invert"], **over}), "invert", InvertConfig)


def test_diffs_recipe_runs_168_passes_per_draw_where_it_ran_221(recipe_project, monkeypatch):
    root = recipe_project
    model = load_diffusion_model(root / "model", parts=("unet", "text_encoder"))
    rows = Rows(monkeypatch, RESOLUTION[1] // 8)
    contexts = prompt_contexts(model, read_prompts(root / "encoded").texts)
    out = root / "trajectories" / "game"
    out.mkdir(parents=True)
    attrs = {"unet_timesteps": _invert_cfg().inversion().unet_timesteps(), "fingerprint": "x"}
    invert_set(model, str(root / "encoded"), "game", out, _invert_cfg(), contexts, True, attrs)
    assert rows.n == 2 * (33 + 33 * 3)  # two images, one draw each
    ext_cfg = config(
        "extract",
        extract.ExtractConfig,
        # fp16: the tiny model's taps are narrower than the recipe's 64 PCA components, and the
        # storage changes no pass
        **{**RECIPE["extract"], "shard_mb": shard_mb(2, model, variants=2), "storage": "fp16"},
    )
    model_cfg = read_group(PARAMS, "model", ModelConfig)
    (root / "trajectories" / "real").mkdir()
    invert_set(
        model,
        str(root / "encoded"),
        "real",
        root / "trajectories" / "real",
        _invert_cfg(),
        contexts,
        False,
        attrs,
    )
    rows.n = 0
    for t in NINE:
        extract.run(
            ext_cfg,
            model_cfg,
            t,
            root / "encoded",
            root / "trajectories",
            root / "model",
            root / "features" / f"t{t}",
        )
    # Per source draw 9 x (1 plain + 3 guided); per target image 9 x (1 + 1).
    assert rows.n == 2 * 9 * 4 + 1 * 9 * 2


def test_the_plan_counts_what_the_loops_run() -> None:
    """The budget's passes per draw are the loops' (passes, variant_passes), for DIFF's recipe."""
    recipe = apply_recipe(PARAMS, RECIPE)
    counts = {"gta5": 10, "cityscapes": 4, "acdc": 3, "darkzurich": 2}
    budget = plan(recipe, counts, guided_classes=2)
    by = {(r.stage, r.what.split(":")[0]): r for r in budget.rows}
    assert by["invert", "gta5-crops"].passes == 10 * 2 * (33 + 33 * 3)
    assert by["extract@t x 9", "gta5-crops"].passes == 10 * 2 * 9 * 4
    assert by["extract@t x 9", "cityscapes"].passes == 4 * 9 * 2
    inv = _invert_cfg().inversion()
    assert passes(inv, 1) == 33 and passes(_invert_cfg(last_timestep=None).inversion()) == 36
    assert variant_passes("", "diff") == 1 and variant_passes(GUIDED_DIFF_PROMPT, "diff", 2) == 3
    assert variant_passes("a photo", "diff") == 2 and variant_passes("a photo", "single") == 1


@torch.no_grad()
def test_ending_the_inversion_at_the_last_saved_step_keeps_every_stored_step() -> None:
    """x_0 .. x_33 of the trajectory ending at t = 91 are those of the whole 37-step one, bit
    for bit: the steps cut feed no stored latent."""
    model = tiny_model(prediction_type="epsilon")
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 16)
    noises = {i: torch.randn(2, 4, 8, 16) for i in range(37)}
    plain = prompt_contexts(model, [""]).plain
    whole = invert(
        model, x0, _invert_cfg(last_timestep=None).inversion(), plain, plain, lambda i, p: noises[i]
    )
    cut = invert(model, x0, _invert_cfg().inversion(), plain, plain, lambda i, p: noises[i])
    assert whole.shape[0] == 37 and cut.shape[0] == 34
    assert torch.equal(cut, whole[:34])


@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_guided_trajectories_of_a_batch_are_each_image_s_own(dtype, tol) -> None:
    """One UNet call a step for several images (each with its own class prompts, masks and
    noise) gives each image's trajectory run alone. Not bit for bit: the rows a call batches
    change float32 sums by ~1e-6 (measured on this CPU), within fp16 rounding in fp16."""
    model = tiny_model(prediction_type="epsilon")
    model.unet.to(dtype)
    torch.manual_seed(1)
    inv = _invert_cfg(schedule=[240, 160, 80, 20, 5, 1], last_timestep=None).inversion()
    plain = prompt_contexts(model, [""]).plain.to(dtype)
    x0 = torch.randn(3, 4, 8, 16).to(dtype)
    prompts, noise = [], []
    for b in range(3):
        pairs = [(plain, torch.ones(1, 1, 8, 16))]
        for c in range(b):  # 0, 1 and 2 class prompts
            mask = torch.zeros(1, 1, 8, 16)
            mask[..., c * 4 : c * 4 + 6] = 1
            pairs.append((torch.randn(1, 77, 16).to(dtype), mask))
        prompts.append(pairs)
        table = {(i, p): torch.randn(1, 4, 8, 16) for i in range(6) for p in range(3)}
        noise.append(lambda i, p, table=table: table[i, p])
    together = invert_guided(model, x0, inv, plain, prompts, noise)
    for b in range(3):
        alone = invert_guided(model, x0[b : b + 1], inv, plain, [prompts[b]], [noise[b]])
        torch.testing.assert_close(together[:, b : b + 1], alone, atol=tol, rtol=tol)
