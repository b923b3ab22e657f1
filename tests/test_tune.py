"""Test-time prompt tuning on a tiny real SD-family model and a real fusion + head."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import config, encoded_prompts, fusion_config, head_config, tiny_model, write_params
from safetensors.torch import load_file

from pipeline.cache.encoded import PROMPTS_NAME, create_rows_array, write_prompts
from pipeline.cache.reader import FeatureDataset, tap_specs
from pipeline.cache.storage import parse_storage
from pipeline.core.classes import NUM_CLASSES
from pipeline.diffusion.model import save_diffusion_model
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import encode_text
from pipeline.heads.inference import evaluate_dataset
from pipeline.heads.model import SegModel
from pipeline.loops.extract import ExtractConfig, extract_store
from pipeline.loops.features import FeatureRecipe
from pipeline.loops.tune import (
    LearnablePrompt,
    TuneConfig,
    entropy_objective,
    evaluate_online,
    freeze,
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
    recipes = [FeatureRecipe(taps, t, 0, "add", 0, parse_storage("fp16")) for t in TIMESTEPS]
    inputs = {f"t{t}/{tap.name}": [tap.channels, tap.stride] for t in TIMESTEPS for tap in taps}
    torch.manual_seed(0)
    head = SegModel(
        fusion_config(inputs=inputs, widths=[8, 8, 8, 8]), head_config(kind="mlp", embed_dim=16)
    )
    freeze(model.unet, model.vae, model.text_encoder, head)
    torch.manual_seed(1)
    latents = torch.randn(4, 4, 8, 16)
    shas = [f"{i:064x}" for i in range(4)]
    return model, head, recipes, latents, shas


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
    model, head, recipes, latents, shas = parts
    prompt = LearnablePrompt(model, PROMPT)
    feats = online_features(model, latents[:2], shas[:2], PROMPT, prompt(), recipes)
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
    model, head, recipes, latents, shas = parts
    cfg = config("tune_prompt", TuneConfig, steps=12, lr=0.05, batch_size=2, images=4,
                 eval_batch_size=4)  # fmt: skip
    initial = LearnablePrompt(model, PROMPT).token_embeds.detach().clone()
    result = tune_prompt(model, head, latents, shas, recipes, PROMPT, cfg, progress=False)
    assert result.token_embeds.shape == initial.shape
    assert (result.token_embeds - initial).abs().max() > 1e-3
    assert result.objective_after < result.objective_before
    assert len(result.curve) == cfg.steps
    assert result.context.shape == (1, 77, 16)
    # The UNet, text encoder and head are unchanged: the next prompt starts from the same place.
    torch.testing.assert_close(LearnablePrompt(model, PROMPT).token_embeds, initial)
    labels = torch.randint(0, NUM_CLASSES, (4, 64, 128))
    scores = evaluate_online(
        model, head, latents, shas, labels, PROMPT, result.context, recipes, 2, progress=False
    )
    assert set(scores) == {"mIoU", "aAcc", "IoU"}
    assert len(scores["IoU"]) == NUM_CLASSES
    assert 0.0 <= scores["aAcc"] <= 100.0


@pytest.mark.parametrize("storage", ["fp16", "int8", "pca-4"])
def test_stage_end_to_end_matches_the_cached_features(tmp_path, monkeypatch, storage) -> None:
    """Real stores from extract, a saved head, then the stage script: outputs, and online
    features equal to the stored ones bit for bit (storage rounding included)."""
    model = tiny_model()
    fp = save_diffusion_model(model, tmp_path / "model")
    n, prompt = 6, "a photo of a city street"
    index = pd.DataFrame(
        {
            "domain": ["fog"] * 3 + ["game"] * 3,
            "split": ["val"] * 3 + ["train"] * 3,
            "image": [f"img{i}.png" for i in range(n)],
            "label": [f"lab{i}.png" for i in range(n)],
            "sha256": [f"{i:064x}" for i in range(n)],
            "height": 64,
            "width": 128,
        }
    )
    enc = tmp_path / "encoded"
    enc.mkdir()
    index.to_parquet(enc / "index.parquet")
    torch.manual_seed(0)
    attrs = {"model_fingerprint": fp, "resolution": [64, 128]}
    lat = create_rows_array(enc / "latents.zarr", (n, 4, 8, 16), "float32", attrs)
    lat[:] = torch.randn(n, 4, 8, 16).numpy()
    labels = create_rows_array(enc / "labels.zarr", (n, 64, 128), "uint8", attrs)
    labels[:] = np.random.default_rng(0).integers(0, NUM_CLASSES, (n, 64, 128), dtype=np.uint8)
    prompts = encoded_prompts(model, ["scene"], [prompt])
    write_prompts(prompts, enc / PROMPTS_NAME)
    cfg = config("extract", ExtractConfig, taps="diff", batch_size=3, images_per_shard=3,
                 storage=storage)  # fmt: skip
    stores = []
    for t in TIMESTEPS:
        stores.append(tmp_path / "features" / f"t{t}")
        extract_store(model, lat, index, prompts, t, stores[-1], cfg, "fp32", progress=False)
    specs = tap_specs(stores)
    torch.manual_seed(0)
    head = SegModel(
        fusion_config(inputs={k: list(v) for k, v in specs.items()}, widths=[8] * 4),
        head_config(kind="mlp", embed_dim=16),
    )
    head.save_pretrained(tmp_path / "heads")

    # The online pass reproduces the stored values exactly (same images, same batch).
    recipes = recipes_of_head(model, head.input_specs, str(tmp_path / "features"))
    ds = FeatureDataset(stores, [0, 1, 2], encoded_dir=enc)
    with torch.no_grad():
        context = LearnablePrompt(model, prompt)()
        online = online_features(model, torch.from_numpy(lat[:3]), index["sha256"][:3].tolist(),
                                 prompt, context, recipes)  # fmt: skip
    for key in specs:
        cached = torch.stack([ds[i]["features"][key] for i in range(3)]).float()
        assert torch.equal(online[key], cached), key

    write_params(tmp_path / "params.yaml", tune_prompt={
        "steps": 3, "lr": 0.05, "batch_size": 2, "images": 3, "eval_images": 0,
        "eval_batch_size": 3})  # fmt: skip
    args = ["model", "heads", "encoded", "features", "prompts", "metrics/tune_prompt.json"]
    # In-process (runpy) rather than a subprocess: importing torch + diffusers again costs ~10 s.
    script = str(ROOT / "stages" / "tune_prompt.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tune_prompt.py", *args])
    with pytest.raises(SystemExit) as exit_info:  # run_stage always exits, 0 on success
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    metrics = json.loads((tmp_path / "metrics" / "tune_prompt.json").read_text())
    assert list(metrics) == ["fog"]
    fog = metrics["fog"]
    for when in ("before", "after"):
        assert set(fog[when]) == {"mIoU", "aAcc", "IoU"}
        assert len(fog[when]["IoU"]) == NUM_CLASSES
    assert isinstance(fog["prompt"], str) and fog["init_prompt"] == prompt
    saved = load_file(str(tmp_path / "prompts" / "fog.safetensors"))
    assert saved["context"].shape == (1, 77, 16)
    assert saved["token_embeds"].shape[0] == len(model.tokenizer.tokenize(prompt))
    # "before" (online features) scores exactly what the head scores on the cached store.
    cached = evaluate_dataset(SegModel.from_pretrained(tmp_path / "heads"), ds, progress=False)
    assert cached[0].scores() == fog["before"]
    # A head trained without a prompt (variant 0 = plain) has no tokens to tune: the stage
    # says so and writes empty outputs instead of failing the pipeline.
    write_prompts(encoded_prompts(model, ["plain"], [""]), enc / PROMPTS_NAME)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "metrics" / "tune_prompt.json").read_text()) == {}
