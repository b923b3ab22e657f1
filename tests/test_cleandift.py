"""CleanDIFT: its heads, timesteps and loss pinned against its code; the stage trains a UNet that
model.unet loads; noise_mode clean reads the clean latent; a state-dict file replaces the UNet."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from _cleandift_reference import (
    FFNStack,
    FourierFeatures,
    MappingNetwork,
    adapted_loss,
    stratified_t,
)
from helpers import (
    PARAMS,
    STORE_MODEL,
    config,
    extract,
    make_encoded,
    shard_mb,
    store_model,
    tiny_model,
)
from torch import nn

from pipeline.cache.encoded import open_latents, read_prompts, read_whole
from pipeline.cache.store import FeatureStore
from pipeline.core.errors import ConfigError
from pipeline.core.params import read_group
from pipeline.diffusion.build import ModelConfig, sd21_architecture
from pipeline.diffusion.cleandift import ProjectionHeads, alignment_loss, stratified_timesteps
from pipeline.diffusion.model import load_diffusion_model
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import unet_features
from pipeline.loops import cleandift
from pipeline.loops.extract import ExtractConfig

# configs/sd21_feature_extractor.yaml:38-49
SD21_FEATURE_DIMS = {"mid": 1280, **{f"us{i}": 1280 for i in range(1, 7)}}
SD21_FEATURE_DIMS |= {"us7": 640, "us8": 640, "us9": 640, "us10": 320}


def _reference_of(ours: ProjectionHeads) -> nn.Module:
    """CleanDIFT's time embedding, mapping and adapters holding `ours`' weights."""
    ref = nn.Module()
    ref.time_emb = FourierFeatures(1, 256)
    ref.time_in_proj = nn.Linear(256, 256, bias=False)
    ref.mapping = MappingNetwork(2, 256, 768)
    ref.adapters = nn.ModuleDict(
        {k: FFNStack(len(h[0].norm.linear.weight), 3, 1, 256) for k, h in ours.heads.items()}
    )
    renames = [
        (r"^mapping\.fourier$", "time_emb.weight"),
        (r"^mapping\.proj\.", "time_in_proj."),
        (r"^mapping\.(in_norm|out_norm|blocks)", r"mapping.\1"),
        (r"^heads\.(\w+)\.(\d+)\.", r"adapters.\1.layers.\2."),
        (r"\.up\.weight$", ".up_proj.weight"),
        (r"\.down\.weight$", ".down_proj.weight"),
    ]
    state = {}
    for key, value in ours.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        state[key] = value
    ref.load_state_dict(state, strict=True)
    return ref


def test_projection_heads_and_loss_are_cleandifts() -> None:
    torch.manual_seed(0)
    channels = {"mid": 16, "us1": 8}
    ours = ProjectionHeads(channels)
    with torch.no_grad():  # CleanDIFT zero-initialises the gates: randomise to compare anything
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = _reference_of(ours)
    B, bins = 2, 3
    t = stratified_timesteps(B, bins, 1, 999, torch.Generator().manual_seed(1))
    clean = {k: torch.randn(B * bins, c, 4, 6) for k, c in channels.items()}
    teacher = {k: 2 * x + torch.randn_like(x) for k, x in clean.items()}  # related to the clean
    expected = adapted_loss(
        clean, teacher, t, ref.adapters, ref.time_emb, ref.time_in_proj, ref.mapping
    )
    got = alignment_loss(ours(clean, t.reshape(-1)), teacher)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(got.detach()) < -0.5  # two keys, each of cosine well above 0


def test_fresh_heads_are_the_identity() -> None:
    """Zero-initialised down projections (layers.py:18): the heads start as the identity."""
    heads = ProjectionHeads({"mid": 8})
    x = torch.randn(3, 8, 2, 2)
    out = heads({"mid": x}, torch.tensor([1, 500, 998]))["mid"]
    torch.testing.assert_close(out, x.flatten(2).transpose(1, 2))


def test_teacher_timesteps_are_stratified_as_cleandift_draws_them() -> None:
    gen = torch.Generator().manual_seed(3)
    ours = stratified_timesteps(64, 3, 1, 999, gen)
    rand = torch.rand((64, 3), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, stratified_t(64, 1, 999, 3, rand))
    edges = 1 + np.arange(4) * (998 / 3)
    for b in range(3):
        assert ((ours[:, b] >= np.floor(edges[b])) & (ours[:, b] < edges[b + 1])).all()


def test_cleandift_taps_are_its_feature_keys_on_sd21() -> None:
    """The `cleandift` preset reads the blocks CleanDIFT's extractor returns, with its widths."""
    unet = sd21_architecture().unet
    taps = resolve_taps(unet, "cleandift")
    assert {t.name: t.channels for t in taps} == SD21_FEATURE_DIMS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cleandift")
    store_model(root / "model")
    make_encoded(root / "encoded", load_diffusion_model(root / "model"), 12, ("a street",))
    cfg = config(
        "cleandift",
        cleandift.CleanDiftConfig,
        steps=30,
        batch_size=4,
        lr=0.001,
        warmup=5,
        threads=1,
    )
    model_cfg = read_group(PARAMS, "model", ModelConfig)
    out = root / "cleandift"
    cleandift.run(
        cfg,
        model_cfg,
        str(root / "model"),
        str(root / "encoded"),
        str(out),
        str(root / "cleandift.json"),
    )
    return root


def test_the_stage_aligns_the_clean_pass_with_the_noisy_teacher(trained) -> None:
    record = json.loads((trained / "cleandift.json").read_text())
    assert record["steps"] == 30 and record["unet_passes"] == 30 * 4 * (3 + 1)
    assert record["loss_last"] < record["loss_first"] - 0.01, record
    base = load_diffusion_model(trained / "model", parts=("unet",))
    tuned = load_diffusion_model(
        trained / "model", parts=("unet",), unet=trained / "cleandift" / "unet"
    )
    assert tuned.fingerprint == base.fingerprint  # latents and prompts stay valid
    assert tuned.unet_fingerprint != base.unet_fingerprint  # features do not
    changed = [
        k
        for k, v in tuned.unet.state_dict().items()
        if not torch.equal(v, base.unet.state_dict()[k])
    ]
    assert changed


def test_clean_mode_stores_one_pass_on_the_clean_latent(trained, tmp_path) -> None:
    model = load_diffusion_model(
        trained / "model", parts=("unet", "text_encoder"), unet=trained / "cleandift" / "unet"
    )
    cfg = config(
        "extract",
        ExtractConfig,
        noise_mode="clean",
        shard_mb=shard_mb(4, model, "dift"),
        taps="dift",
    )
    extract(model, trained / "encoded", 261, tmp_path / "t261", cfg)
    store = FeatureStore.open(tmp_path / "t261")
    assert store.identity.model_fingerprint == model.unet_fingerprint
    stored = np.stack([store.read("up1_out", i) for i in range(2)])
    # The store's first batch (its first shard's 4 images), as extract ran the UNet on it.
    latents = torch.from_numpy(
        read_whole(open_latents(trained / "encoded", "game"), (slice(0, 4), 0))
    )
    context = read_prompts(trained / "encoded").embeddings[:1]
    taps = resolve_taps(model.unet, "dift", model.vae_stride)
    with torch.no_grad():
        direct = unet_features(model, latents, 261, context, taps)["up1_out"][:2]
    np.testing.assert_array_equal(stored, direct.half().float().numpy())
    noisy = config("extract", ExtractConfig, shard_mb=shard_mb(4, model, "dift"), taps="dift")
    extract(model, trained / "encoded", 261, tmp_path / "noisy" / "t261", noisy)
    again = FeatureStore.open(tmp_path / "noisy" / "t261").read("up1_out", 0)
    assert not np.allclose(again, stored[0])


def test_a_state_dict_file_replaces_the_unet(trained, tmp_path) -> None:
    tuned = load_diffusion_model(
        trained / "model", parts=("unet",), unet=trained / "cleandift" / "unet"
    )
    path = tmp_path / "cleandift_unet.safetensors"
    safetensors.torch.save_file(tuned.unet.state_dict(), str(path))
    loaded = load_diffusion_model(trained / "model", parts=("unet",), unet=path)
    for k, v in tuned.unet.state_dict().items():
        assert torch.equal(v, loaded.unet.state_dict()[k]), k
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(
        tiny_model(**{**STORE_MODEL, "unet_channels": [8, 8]}).unet.state_dict(), str(other)
    )
    with pytest.raises(
        ConfigError, match="other.safetensors: not a UNet of this model's architecture"
    ):
        load_diffusion_model(trained / "model", parts=("unet",), unet=other)


def test_model_unet_must_exist_or_be_the_stage_s_output(tmp_path) -> None:
    cleandift.check_unet_source(None, 0)
    cleandift.check_unet_source(cleandift.CLEANDIFT_UNET, 100)
    with pytest.raises(ConfigError, match="not a diffusers UNet folder"):
        cleandift.check_unet_source(str(tmp_path / "nothing"), 0)


def test_the_optimiser_and_schedule_are_cleandifts() -> None:
    """params.yaml's cleandift group holds CleanDIFT's lr, batch and warm-up (its config), and
    the stage's optimiser is its Adam with transformers' constant_with_warmup, step by step."""
    from _cleandift_reference import CONFIG
    from transformers import get_scheduler

    cfg = read_group(PARAMS, "cleandift", cleandift.CleanDiftConfig)
    assert (cfg.lr, cfg.batch_size, cfg.warmup) == (
        CONFIG["lr"],
        CONFIG["batch_size"],
        CONFIG["num_warmup_steps"],
    )
    ours = [torch.nn.Parameter(torch.zeros(1))]
    opt, sched = cleandift.optimiser(ours, cfg)
    theirs = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=CONFIG["lr"])
    ref = get_scheduler("constant_with_warmup", theirs, num_warmup_steps=CONFIG["num_warmup_steps"])
    assert isinstance(opt, torch.optim.Adam)
    for _ in range(CONFIG["num_warmup_steps"] + 50):
        assert opt.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
        opt.step(), theirs.step(), sched.step(), ref.step()
