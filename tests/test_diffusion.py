"""The small SD-family model: build, save/load through the SD loader, bad folders, prediction types."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import config, encode_images, tiny_model

from pipeline.core.errors import ConfigError, ModelError
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.model import (
    fingerprint,
    load_diffusion_model,
    save_diffusion_model,
    write_pointer,
)
from pipeline.diffusion.noising import denoising_target, predict_x0_eps
from pipeline.diffusion.text import encode_text as encode_prompts


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = tiny_model()
    path = tmp_path_factory.mktemp("m") / "model"
    save_diffusion_model(model, path)
    return model, path


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_round_trip_same_outputs_and_fingerprint(saved, tmp_path: Path) -> None:
    model, path = saved
    for part in ("vae", "unet", "text_encoder"):
        assert list((path / part).glob("*.safetensors")), part
        assert not [p for p in (path / part).iterdir() if p.suffix in (".bin", ".ckpt")]
    assert (path / "tokenizer" / "vocab.json").is_file()
    assert (path / "tokenizer" / "merges.txt").is_file()
    loaded = load_diffusion_model(path)
    assert loaded.fingerprint == model.fingerprint == fingerprint(path)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.tokenizer.tokenize("a city street in fog") == [
        "a</w>",
        "city</w>",
        "street</w>",
        "in</w>",
        "fog</w>",
    ]
    prompts = ["", "a street scene, video game"]
    with torch.no_grad():
        a, b = encode_prompts(model, prompts), encode_prompts(loaded, prompts)
        assert a.shape == (2, 77, 16)
        torch.testing.assert_close(a, b)
        images = torch.rand(2, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(encode_images(model, images), encode_images(loaded, images))
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
        torch.testing.assert_close(model.unet(x, t, a).sample, loaded.unet(x, t, b).sample)
    # The fingerprint follows the weights, not the folder's location.
    moved = _copy(path, tmp_path)
    assert fingerprint(moved) == model.fingerprint
    assert load_diffusion_model(moved, dtype="bf16").unet.dtype == torch.bfloat16


def test_fingerprint_changes_with_weights(saved, tmp_path: Path) -> None:
    model, path = saved
    other = tiny_model(seed=1)
    assert save_diffusion_model(other, tmp_path / "other") != model.fingerprint


@pytest.mark.parametrize("part", ["unet", "scheduler", "tokenizer"])
def test_missing_component(saved, tmp_path: Path, part: str) -> None:
    broken = _copy(saved[1], tmp_path)
    shutil.rmtree(broken / part)
    with pytest.raises(ModelError, match=f"{broken}.*missing component folder '{part}/'"):
        load_diffusion_model(broken)


def test_pickle_only_weights_refused(saved, tmp_path: Path) -> None:
    broken = _copy(saved[1], tmp_path)
    weights = next((broken / "vae").glob("*.safetensors"))
    weights.rename(broken / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(
        ModelError, match=r"vae: pickle weights only \(diffusion_pytorch_model.bin\)"
    ):
        load_diffusion_model(broken)


def test_not_a_model_folder_hub_ids_and_parts(saved, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        load_diffusion_model(tmp_path / "empty")
    with pytest.raises(ModelError, match="no such model folder.*local folder"):
        load_diffusion_model("stabilityai/stable-diffusion-2-1")  # nothing is downloaded
    with pytest.raises(ModelError, match="unknown dtype"):
        load_diffusion_model(tmp_path / "empty", dtype="fp8")
    unet_only = load_diffusion_model(saved[1], parts=("unet",))
    assert unet_only.vae_stride == 8 and unet_only.unet is not None
    with pytest.raises(ModelError, match="vae was not loaded"):
        unet_only.vae  # noqa: B018


def test_half_precision_on_a_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="model: dtype fp16 on the CPU is 4-150x slower"):
        config("model", ModelConfig, dtype="fp16", device="cpu")
    assert config("model", ModelConfig, dtype="bf16", device="cuda").dtype == "bf16"


def test_pointer_loads_target_and_detects_changes(saved, tmp_path: Path) -> None:
    model, path = saved
    target = _copy(path, tmp_path)
    pointer = tmp_path / "model_init"
    assert write_pointer(target, pointer) == model.fingerprint
    assert json.loads((pointer / "pointer.json").read_text())["target"] == str(target.resolve())
    assert fingerprint(pointer) == model.fingerprint
    assert load_diffusion_model(pointer).fingerprint == model.fingerprint
    cfg = json.loads((target / "unet" / "config.json").read_text())
    cfg["norm_eps"] = 1e-3
    (target / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="changed since its pointer was written"):
        load_diffusion_model(pointer)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_prediction_type_respected(kind: str) -> None:
    model = tiny_model(prediction_type=kind)
    assert model.prediction_type == kind
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 300, 900])
    noisy = model.scheduler.add_noise(x0, noise, t)
    target = denoising_target(model, x0, noise, t)
    if kind == "epsilon":
        torch.testing.assert_close(target, noise)
    else:
        assert not torch.allclose(target, noise, atol=1e-2)
    # The perfect model output converts back to the true clean latent and noise.
    got_x0, got_eps = predict_x0_eps(model, noisy, target, t)
    torch.testing.assert_close(got_x0, x0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_eps, noise, atol=1e-3, rtol=1e-3)
