"""Test-time prompt tuning on a tiny real SD-family model and a real fusion + head."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    config,
    encoded_prompts,
    fusion_config,
    head_config,
    make_encoded,
    shard_mb,
    store_model,
    tiny_model,
    write_params,
)
from safetensors.torch import load_file

from pipeline.cache.encoded import (
    PROMPTS_NAME,
    open_latents,
    read_index,
    set_index,
    write_prompts,
)
from pipeline.cache.reader import FeatureReader, tap_specs
from pipeline.cache.storage import parse_storage
from pipeline.cache.store import store_path
from pipeline.cache.trajectories import open_trajectory
from pipeline.core.classes import NUM_CLASSES
from pipeline.core.params import load_params, read_group
from pipeline.data.samples import RowsDataset, to_device
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.diffusion.unet_features import prompt_contexts
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe
from pipeline.heads.inference import evaluate_dataset
from pipeline.heads.seg_model import SegModel
from pipeline.loops import extract, invert
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.tune_prompt import (
    LearnablePrompt,
    TuneConfig,
    entropy_objective,
    evaluate_online,
    freeze,
    latents_at,
    nearest_words,
    online_features,
    recipes_of_head,
    tune_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a city street"
TIMESTEPS = [50, 150]


@pytest.fixture(scope="module")
def parts():
    model = tiny_model()
    taps = [t for t in resolve_taps(model.unet, "diff", model.vae_stride) if t.stride <= 32]
    recipes = [
        FeatureRecipe(taps, t, 0, noise_mode("add"), "single", parse_storage("fp16"))
        for t in TIMESTEPS
    ]
    inputs = {f"t{t}/{tap.name}": [tap.channels, tap.stride] for t in TIMESTEPS for tap in taps}
    torch.manual_seed(0)
    head = SegModel(
        fusion_config(inputs=inputs, widths=[8, 8, 8, 8]), head_config(kind="mlp", embed_dim=16)
    )
    freeze(model.unet, model.vae, model.text_encoder, head)
    torch.manual_seed(1)
    clean = torch.randn(4, 4, 8, 16)
    shas = [f"{i:064x}" for i in range(4)]
    latents_t = latents_at(model, recipes, clean, shas, None, [0, 1, 2, 3])
    return model, head, recipes, latents_t, prompt_contexts(model, [PROMPT])


def test_learnable_prompt_starts_at_the_encoded_prompt(parts) -> None:
    model = parts[0]
    prompt = LearnablePrompt(model, PROMPT)
    assert prompt.n_tokens == len(model.tokenizer.tokenize(PROMPT))
    assert [p is prompt.token_embeds for p in prompt.parameters()] == [True]
    with torch.no_grad():
        torch.testing.assert_close(prompt(), encode_text(model, [PROMPT]))
        prompt.token_embeds.add_(1.0)
        assert not torch.allclose(prompt(), encode_text(model, [PROMPT]))
    assert "street" in nearest_words(model, LearnablePrompt(model, PROMPT).token_embeds)


def test_gradients_reach_the_prompt_and_nothing_else(parts) -> None:
    model, head, recipes, latents_t, contexts = parts
    prompt = LearnablePrompt(model, PROMPT)
    x_t = {t: x[:2] for t, x in latents_t.items()}
    feats = online_features(model, x_t, PROMPT, prompt(), recipes, contexts)
    assert set(feats) == set(head.input_specs)
    loss = entropy_objective(head(feats), "confidence", threshold=1.0, diversity=0.5)
    loss.backward()
    assert prompt.token_embeds.grad is not None
    assert prompt.token_embeds.grad.abs().sum() > 0
    for part in (model.unet, model.vae, model.text_encoder, head):
        for name, p in part.named_parameters():
            assert not p.requires_grad, name
            assert p.grad is None, name


def test_tuning_changes_the_prompt_and_lowers_the_objective(parts) -> None:
    model, head, recipes, latents_t, contexts = parts
    cfg = config(
        "tune_prompt", TuneConfig, steps=12, lr=0.05, batch_size=2, images=4, eval_batch_size=4
    )
    initial = LearnablePrompt(model, PROMPT).token_embeds.detach().clone()
    result = tune_prompt(model, head, latents_t, recipes, PROMPT, contexts, cfg, progress=False)
    assert result.token_embeds.shape == initial.shape
    assert (result.token_embeds - initial).abs().max() > 1e-3
    assert result.objective_after < result.objective_before
    assert len(result.curve) == cfg.steps
    assert result.context.shape == (1, 77, 16)
    # The UNet, text encoder and head are unchanged: the next prompt starts from the same place.
    torch.testing.assert_close(LearnablePrompt(model, PROMPT).token_embeds, initial)
    labels = torch.randint(0, NUM_CLASSES, (4, 64, 128))
    scores = evaluate_online(
        model,
        head,
        latents_t,
        labels,
        PROMPT,
        result.context,
        recipes,
        contexts,
        2,
        progress=False,
    )
    assert set(scores) == {"mIoU", "aAcc", "IoU"}
    assert len(scores["IoU"]) == NUM_CLASSES
    assert 0.0 <= scores["aAcc"] <= 100.0


@pytest.mark.parametrize(
    "storage,noise_mode",
    [("fp16", "add"), ("int8", "add"), ("pca-4", "add"), ("fp16", "trajectory")],
)
def test_stage_end_to_end_matches_the_cached_features(tmp_path, monkeypatch, storage, noise_mode):
    """Real stores from extract, a saved head, then the stage script: outputs, and online
    features equal to the stored ones bit for bit (storage rounding, cached trajectories)."""
    model = store_model(tmp_path / "model")
    prompt = "a photo of a city street"
    enc = tmp_path / "encoded"
    make_encoded(enc, model, 9, (prompt,), names=("scene",))  # game: 6 train, real: 3 val
    timesteps = TIMESTEPS if noise_mode == "add" else [1, 20]
    mb = shard_mb(3, model, storage=storage)
    over = dict(taps="diff", batch_size=3, shard_mb=mb, storage=storage, noise_mode=noise_mode)
    write_params(
        tmp_path / "params.yaml",
        timesteps=timesteps,
        extract=over,
        invert={"schedule": [40, 20, 1]},
        tune_prompt={
            "steps": 3,
            "lr": 0.05,
            "batch_size": 2,
            "images": 3,
            "eval_images": 0,
            "eval_batch_size": 3,
        },
    )
    params = load_params(tmp_path / "params.yaml")
    model_cfg = read_group(params, "model", ModelConfig)
    invert.run(
        read_group(params, "invert", invert.InvertConfig),
        noise_mode,
        model_cfg,
        enc,
        tmp_path / "model",
        tmp_path / "trajectories",
        tmp_path / "invert.json",
    )
    cfg = read_group(params, "extract", ExtractConfig)
    for t in timesteps:
        extract.run(
            cfg,
            model_cfg,
            t,
            enc,
            tmp_path / "trajectories",
            tmp_path / "model",
            tmp_path / "features" / f"t{t}",
            tmp_path / f"extract{t}.json",
        )
    stores = [store_path(tmp_path / "features", t, "real") for t in timesteps]
    specs = tap_specs(stores)
    torch.manual_seed(0)
    head = SegModel(
        fusion_config(inputs={k: list(v) for k, v in specs.items()}, widths=[8] * 4),
        head_config(kind="mlp", embed_dim=16),
    )
    head.save_pretrained(tmp_path / "heads")

    # The online pass reproduces the stored values exactly (same images, same batch).
    recipes = recipes_of_head(model, head.input_specs, str(tmp_path / "features"), "real")
    reader = FeatureReader(stores, encoded_dir=enc, set_name="real")
    ds = RowsDataset(reader, [0, 1, 2])
    clean = torch.from_numpy(np.asarray(open_latents(enc, "real")[:3, 0]))
    shas = set_index(read_index(enc), "real")["sha256"].tolist()
    trajectory = (
        open_trajectory(tmp_path / "trajectories", "real", False) if noise_mode != "add" else None
    )
    contexts = prompt_contexts(model, [prompt])
    with torch.no_grad():
        x_t = latents_at(model, recipes, clean, shas, trajectory, [0, 1, 2])
        context = LearnablePrompt(model, prompt)()
        online = online_features(model, x_t, prompt, context, recipes, contexts)
    for key in specs:
        # int8 arrives as values and scales, decoded where the head runs
        cached = torch.stack([to_device(reader.features(i), "cpu")[key] for i in range(3)])
        assert torch.equal(online[key], cached), key

    args = [
        "model",
        "heads",
        "encoded",
        "trajectories",
        "features",
        "prompts",
        "metrics/tune_prompt.json",
        "metrics/tuned.json",
        "dvclive/tune_prompt",
    ]
    # In-process (runpy) rather than a subprocess: importing torch + diffusers again costs ~10 s.
    script = str(ROOT / "stages" / "tune_prompt.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tune_prompt.py", *args])
    with pytest.raises(SystemExit) as exit_info:  # run_stage always exits, 0 on success
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    metrics = json.loads((tmp_path / "metrics" / "tune_prompt.json").read_text())
    assert list(metrics) == ["real"]
    real = metrics["real"]
    for when in ("before", "after"):
        assert set(real[when]) == {"mIoU", "aAcc", "IoU"}
        assert len(real[when]["IoU"]) == NUM_CLASSES
    assert isinstance(real["prompt"], str) and real["init_prompt"] == prompt
    # The metric one compares: mIoU before and after; the objective's curve is dvclive's.
    tuned = json.loads((tmp_path / "metrics" / "tuned.json").read_text())
    assert tuned == {"real": {"before": real["before"]["mIoU"], "after": real["after"]["mIoU"]}}
    curve = (tmp_path / "dvclive/tune_prompt/plots/metrics/real/objective.tsv").read_text()
    assert curve.splitlines()[0].split("\t") == ["step", "objective"]
    assert len(curve.splitlines()) == 1 + params["tune_prompt"]["steps"]
    saved = load_file(str(tmp_path / "prompts" / "real.safetensors"))
    assert saved["context"].shape == (1, 77, 16)
    assert saved["token_embeds"].shape[0] == len(model.tokenizer.tokenize(prompt))
    # "before" (online features) scores exactly what the head scores on the cached store.
    cached = evaluate_dataset(SegModel.from_pretrained(tmp_path / "heads"), ds, progress=False)
    assert cached[0].scores() == real["before"]
    # A head trained without a prompt (variant 0 = plain) has no tokens to tune: the stage
    # says so and writes empty outputs instead of failing the pipeline.
    write_prompts(encoded_prompts(model, ["plain"], [""]), enc / PROMPTS_NAME)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "metrics" / "tune_prompt.json").read_text()) == {}
    assert json.loads((tmp_path / "metrics" / "tuned.json").read_text()) == {}
    assert (tmp_path / "dvclive/tune_prompt/plots").is_dir()  # declared: DVC needs it
