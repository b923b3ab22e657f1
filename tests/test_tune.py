"""Test-time prompt tuning on a tiny real SD-family model and a real fusion + head."""

from __future__ import annotations

import pytest
import torch

from pipeline.classes import NUM_CLASSES
from pipeline.diffusion import build_small_model, encode_prompts, tiny_model_config
from pipeline.fusion import FusionConfig
from pipeline.heads import HeadConfig, SegModel
from pipeline.taps import resolve_taps
from pipeline.tune import (
    LearnablePrompt,
    OnlineSetup,
    TuneConfig,
    entropy_objective,
    evaluate_online,
    freeze,
    nearest_words,
    online_features,
    tune_prompt,
)

PROMPT = "a photo of a city street"
TIMESTEPS = [50, 150]


@pytest.fixture(scope="module")
def parts():
    model = build_small_model(tiny_model_config(), seed=0)
    taps = [
        t for t in resolve_taps(model.unet, "diff", model.vae_stride) if t.name.startswith("up")
    ]
    taps = [t for t in taps if t.stride <= 32]
    setup = OnlineSetup(timesteps=TIMESTEPS, taps={t: taps for t in TIMESTEPS}, noise_seed=0)
    inputs = {f"t{t}/{tap.name}": [tap.channels, tap.stride] for t in TIMESTEPS for tap in taps}
    torch.manual_seed(0)
    head = SegModel(
        FusionConfig(kind="stride", inputs=inputs, widths=[8, 8, 8, 8]),
        HeadConfig(kind="mlp", embed_dim=16, num_classes=NUM_CLASSES),
    )
    freeze(model.unet, model.vae, model.text_encoder, head)
    torch.manual_seed(1)
    latents = torch.randn(4, 4, 8, 16)
    shas = [f"{i:064x}" for i in range(4)]
    return model, head, setup, latents, shas


def test_learnable_prompt_starts_at_the_encoded_prompt(parts) -> None:
    model = parts[0]
    prompt = LearnablePrompt(model, PROMPT)
    assert prompt.n_tokens == len(model.tokenizer.tokenize(PROMPT))
    assert [p is prompt.token_embeds for p in prompt.parameters()] == [True]
    with torch.no_grad():
        torch.testing.assert_close(prompt(), encode_prompts(model, [PROMPT]))
        prompt.token_embeds.add_(1.0)
        assert not torch.allclose(prompt(), encode_prompts(model, [PROMPT]))
    assert "street" in nearest_words(model, LearnablePrompt(model, PROMPT).token_embeds)


def test_gradients_reach_the_prompt_and_nothing_else(parts) -> None:
    model, head, setup, latents, shas = parts
    prompt = LearnablePrompt(model, PROMPT)
    feats = online_features(model, latents[:2], shas[:2], prompt(), setup)
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
    model, head, setup, latents, shas = parts
    cfg = TuneConfig(prompt=PROMPT, steps=12, lr=0.05, batch_size=2, images=4, eval_batch_size=4)
    initial = LearnablePrompt(model, PROMPT).token_embeds.detach().clone()
    result = tune_prompt(model, head, latents, shas, setup, cfg, progress=False)
    assert result.token_embeds.shape == initial.shape
    assert (result.token_embeds - initial).abs().max() > 1e-3
    assert result.objective_after < result.objective_before
    assert len(result.curve) == cfg.steps
    assert result.context.shape == (1, 77, 16)
    # The UNet, text encoder and head are unchanged: the next prompt starts from the same place.
    torch.testing.assert_close(LearnablePrompt(model, PROMPT).token_embeds, initial)
    labels = torch.randint(0, NUM_CLASSES, (4, 64, 128))
    scores = evaluate_online(
        model, head, latents, shas, labels, result.context, setup, batch_size=2, progress=False
    )
    assert set(scores) == {"mIoU", "aAcc", "IoU"}
    assert len(scores["IoU"]) == NUM_CLASSES
    assert 0.0 <= scores["aAcc"] <= 100.0


def test_stage_end_to_end_matches_the_cached_features(tmp_path, monkeypatch) -> None:
    """Real stores from extract, a saved head, then the stage script: outputs + consistency."""
    import json
    import os
    import runpy
    import sys

    import numpy as np
    import pandas as pd
    import yaml
    from safetensors.torch import load_file

    from pipeline.diffusion import save_diffusion_model
    from pipeline.encoded import create_rows_array
    from pipeline.evaluate import evaluate_dataset
    from pipeline.extract import ExtractConfig, extract_store
    from pipeline.reader import FeatureDataset, tap_specs

    model = build_small_model(tiny_model_config(), seed=0)
    fp = save_diffusion_model(model, tmp_path / "model")
    n, prompt = 6, "a photo of a city street"
    domains = ["fog"] * 3 + ["game"] * 3
    splits = ["val"] * 3 + ["train"] * 3
    index = pd.DataFrame(
        {
            "domain": domains,
            "split": splits,
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
    lat = create_rows_array(
        enc / "latents.zarr", (n, 4, 8, 16), "float32", {"model_fingerprint": fp}
    )
    lat[:] = torch.randn(n, 4, 8, 16).numpy()
    labels = create_rows_array(enc / "labels.zarr", (n, 64, 128), "uint8", {})
    labels[:] = np.random.default_rng(0).integers(0, NUM_CLASSES, (n, 64, 128), dtype=np.uint8)
    with torch.no_grad():
        embeds = encode_prompts(model, [prompt])
    cfg = ExtractConfig(taps="diff", batch_size=3, images_per_shard=3)
    stores = []
    for t in TIMESTEPS:
        stores.append(tmp_path / "features" / f"t{t}")
        extract_store(model, lat, index, [prompt], embeds, t, stores[-1], cfg, progress=False)
    specs = {k: v for k, v in tap_specs(stores).items() if v[1] <= 32}
    torch.manual_seed(0)
    head = SegModel(
        FusionConfig(kind="stride", inputs={k: list(v) for k, v in specs.items()}, widths=[8] * 4),
        HeadConfig(kind="mlp", embed_dim=16),
    )
    head.save_pretrained(tmp_path / "heads")
    params = {
        "data": {"targets": {"fog": {}}},
        "model": {"device": "cpu", "dtype": "fp32"},
        "tune_prompt": {"prompt": prompt, "steps": 3, "lr": 0.05, "batch_size": 2, "images": 3,
                        "eval_images": 0, "eval_batch_size": 3},
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", "params.yaml", "--model", "model", "--heads", "heads", "--encoded",
            "encoded", "--features", "features", "--metrics", "metrics/tune_prompt.json",
            "--out", "prompts"]  # fmt: skip
    # In-process (runpy) rather than a subprocess: importing torch + diffusers again costs ~10 s.
    script = os.path.join(os.path.dirname(__file__), "..", "stages", "tune_prompt.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tune_prompt.py", *args])
    with pytest.raises(SystemExit) as exit_info:  # run_stage always exits, 0 on success
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code in (None, 0)
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
    # "before" (online features) agrees with the head on the cached store features.
    ds = FeatureDataset(stores, [0, 1, 2], encoded_dir=enc, taps=[k.split("/")[1] for k in specs])
    cached = evaluate_dataset(SegModel.from_pretrained(tmp_path / "heads"), ds, progress=False)
    assert abs(cached.scores()["aAcc"] - fog["before"]["aAcc"]) < 1.0
    # A head trained without a prompt (variant 0 = plain) has no tokens to tune: the stage
    # says so and writes empty outputs instead of failing the pipeline.
    params["prompts"] = {"variants": ["plain"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code in (None, 0)
    assert json.loads((tmp_path / "metrics" / "tune_prompt.json").read_text()) == {}
