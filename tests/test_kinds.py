"""Each kind (fusion, head, dataset layout, tap preset, storage mode) is declared once, in a table
of its own layer: params accept exactly the table's keys (their check is derived from it), the
builders build every key, and params.yaml's comment names every key."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    PARAMS,
    config,
    extract,
    fusion_config,
    head_config,
    make_encoded,
    params,
    store_model,
    tiny_model,
)

from pipeline.cache.reader import FeatureReader
from pipeline.cache.storage import MODES, Part, Projection, StorageMode, parse_storage
from pipeline.cache.store import METADATA_BYTES, FeatureStore, StoreLayout
from pipeline.core.errors import ConfigError
from pipeline.core.names import FeatureKey
from pipeline.core.params import validate
from pipeline.data.datasets import DatasetEntry
from pipeline.data.layouts import LAYOUTS, label_table
from pipeline.data.samples import Feature, Quantized, to_device
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.taps import PRESETS, preset_paths
from pipeline.extraction.noise import NOISE_MODES, NoiseKey, NoiseMode
from pipeline.extraction.recipe import FeatureRecipe
from pipeline.heads.decoders import HEADS, build_head
from pipeline.heads.fusion import FUSIONS
from pipeline.heads.seg_model import build_fusion
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.invert import InvertConfig
from pipeline.loops.train import TrainConfig
from pipeline.plan.budget import plan
from pipeline.plan.checks import check_all

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"t50/a": [8, 8], "t50/b": [8, 16], "t50/c": [8, 32]}


def _comment(key: str) -> str:
    """params.yaml's comment on `group.key` (with its continuation lines)."""
    group, name = key.split(".")
    text = (ROOT / "params.yaml").read_text()
    block = re.search(rf"^{group}:\n((?:[ #].*\n)+)", text, re.M).group(1)
    lines = block.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"  {name}:", ln))
    out = [lines[start]]
    for line in lines[start + 1 :]:
        if not re.match(r"^\s{6,}#", line):
            break
        out.append(line)
    return " ".join(out)


@pytest.mark.parametrize(
    ("key", "table", "builds"),
    [
        ("train.fusion", FUSIONS, "fusion"),
        ("train.head", HEADS, "head"),
        ("extract.taps", PRESETS, "taps"),
        ("extract.storage", MODES, "storage"),
        ("extract.noise_mode", NOISE_MODES, "noise"),
    ],
)
def test_params_accept_exactly_the_table_and_name_it(key, table, builds) -> None:
    group, name = key.split(".")
    cls = {"train": TrainConfig, "extract": ExtractConfig}[group]
    written = {k: k.replace("<k>", "8") for k in table}  # a pattern's parameter filled in
    for kind in table:
        assert getattr(config(group, cls, **{name: written[kind]}), name) == written[kind]
    with pytest.raises(ConfigError, match=rf"{key}: ") as err:
        config(group, cls, **{name: "no-such-kind"})
    for kind in table:  # the refusal lists the table
        assert kind in str(err.value) and kind in _comment(key), (key, kind)


def test_every_fusion_and_head_builds_and_runs() -> None:
    x = {k: torch.randn(1, c, 64 // s, 64 // s) for k, (c, s) in INPUTS.items()}
    for kind in FUSIONS:
        fusion = build_fusion(fusion_config(kind=kind, inputs=INPUTS))
        maps = fusion(x)
        assert [m.shape[1] for m in maps] == [c for c, _ in fusion.out_specs]
        for head in HEADS:
            logits = build_head(fusion.out_specs, head_config(kind=head))(maps)
            assert logits.shape[:2] == (1, 19)


def test_every_tap_preset_names_modules_of_the_unet() -> None:
    unet = tiny_model().unet
    modules = dict(unet.named_modules())
    for preset in PRESETS:
        paths = preset_paths(unet, preset)
        assert paths and set(paths.values()) <= set(modules), preset


def test_every_storage_mode_parses_and_says_how_to_decode() -> None:
    for pattern in MODES:
        mode = parse_storage(pattern.replace("<k>", "8"))
        assert mode.name == pattern.replace("<k>", "8") and "values" in mode.decode
        assert mode.stored_channels(32) == (8 if "<k>" in pattern else 32)


def test_every_dataset_layout_is_a_kind_with_a_label_table() -> None:
    root = PARAMS["data"]["source"]["root"]
    for kind in LAYOUTS:
        extra = {"condition": "fog"} if kind == "acdc" else {}
        entry = validate({"kind": kind, "root": root, "split": "val", **extra}, DatasetEntry, "e")
        assert entry.kind == kind
        assert label_table(kind).lut.dtype == "uint8"
        kinds_line = re.search(r"# kind \((.*)\)", (ROOT / "params.yaml").read_text()).group(1)
        assert kind in kinds_line.split(" | "), kind
    with pytest.raises(ConfigError, match="e.kind: Input should be 'synthetic', 'gta5'"):
        validate({"kind": "kitti", "root": root, "split": "val"}, DatasetEntry, "e")


class ImageInt8(StorageMode):
    """A scratch storage mode declared here alone: int8 with one scale per image-variant."""

    name, dtype, decode = "int8-image", np.dtype(np.int8), "values * scale[..., None, None]"

    def parts(self, channels: int) -> dict[str, Part]:
        return {"scale": Part((1,), np.dtype(np.float32), ("one",))}

    def reduce(self, x: torch.Tensor, projection: Projection | None) -> dict[str, torch.Tensor]:
        scale = x.detach().float().abs().amax(dim=(1, 2, 3))[:, None] / 127
        q = torch.round(x.float() / scale.clamp_min(1e-30)[..., None, None]).clamp(-127, 127)
        return {"values": q.to(torch.int8), "scale": scale}

    def as_read(self, x: torch.Tensor, projection: Projection | None) -> torch.Tensor:
        stored = self.reduce(x, projection)
        decoded = stored["values"].float() * stored["scale"][..., None, None]
        return x.float() + (decoded - x.float()).detach()

    def decode_parts(self, values: np.ndarray, parts: dict[str, np.ndarray]) -> np.ndarray:
        return values.astype(np.float32) * parts["scale"][0]

    def feature(self, values: torch.Tensor, parts: dict[str, torch.Tensor]) -> Feature:
        return Quantized(values, parts["scale"])


def test_a_storage_mode_declared_in_one_class_validates_writes_reads_and_is_budgeted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing but the class and its MODES line: params take it, extract writes it, the reader
    and the store decode it as its reduction computed, and the plan counts its bytes and files."""
    monkeypatch.setitem(MODES, "int8-image", ImageInt8)
    model = store_model(tmp_path / "model")
    make_encoded(tmp_path / "enc", model, 6)
    cfg = config("extract", ExtractConfig, batch_size=2, storage="int8-image")
    extract(model, tmp_path / "enc", 50, tmp_path / "s", cfg)
    store = FeatureStore.open(tmp_path / "s")
    assert store.storage == ImageInt8() and store.array_names() == [
        a for g in store.groups for a in (f"features/{g}/values", f"features/{g}/scale")
    ]
    reader = FeatureReader([tmp_path / "s"], encoded_dir=tmp_path / "enc", set_name="game")
    for tap in store.taps:
        values, scale = store.read(tap, 1, decode=False)
        assert values.dtype == np.int8 and scale.shape == (1,) and np.abs(values).max() == 127
        decoded = to_device(reader.features(1), "cpu")[str(FeatureKey(50, tap))]
        assert np.array_equal(decoded.numpy(), store.read(tap, 1))
    # Its store is budgeted file by file and byte by byte (data files; metadata on average).
    info = {t: store.tap_info[t] for t in store.taps}
    shapes = {t: (a["model_channels"], a["height"], a["width"]) for t, a in info.items()}
    strides = {t: a["stride"] for t, a in info.items()}
    layout = StoreLayout.of(
        store.n_images, 1, shapes, strides, "int8-image", store.images_per_shard
    )
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert sorted(layout.files()) == sorted(str(p.relative_to(tmp_path / "s")) for p in files)
    data = sum(p.stat().st_size for p in files if p.name != "zarr.json")
    assert layout.bytes() - METADATA_BYTES * sum(p.name == "zarr.json" for p in files) == data
    fp16 = StoreLayout.of(store.n_images, 1, shapes, strides, "fp16", store.images_per_shard)
    assert layout.image_bytes() < 0.6 * fp16.image_bytes()
    with pytest.raises(ConfigError, match="extract.storage: unknown storage mode 'int8-images'"):
        config("extract", ExtractConfig, storage="int8-images")


class Mean(NoiseMode):
    """A scratch noise mode declared here alone: x_t the q-sample's mean, sqrt(abar_t) x_0."""

    name = "mean"

    def x_t(self, model: DiffusionModel, latents: torch.Tensor, key: NoiseKey) -> torch.Tensor:
        return latents * model.scheduler.alphas_cumprod[key.timestep].sqrt().to(latents)


def test_a_noise_mode_declared_in_one_class_validates_extracts_and_is_budgeted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing but the class and its NOISE_MODES line: params take it, extract computes its
    x_t and records it, the recipe of the store finds it again, and the plan and check_params
    budget it without an inversion."""
    monkeypatch.setitem(NOISE_MODES, "mean", Mean())
    model = store_model(tmp_path / "model")
    make_encoded(tmp_path / "enc", model, 6)
    stores = {}
    for mode in ("mean", "clean"):
        cfg = config("extract", ExtractConfig, batch_size=2, noise_mode=mode)
        extract(model, tmp_path / "enc", 500, tmp_path / mode, cfg)
        stores[mode] = FeatureStore.open(tmp_path / mode)
    assert stores["mean"].identity.noise_mode == "mean"
    assert FeatureRecipe.of_store(model, stores["mean"]).noise is NOISE_MODES["mean"]
    # At t = 500 the mean is 0.5 x_0's scale: features other than the clean latent's.
    tap = stores["mean"].taps[0]
    assert not np.allclose(stores["mean"].read(tap, 0), stores["clean"].read(tap, 0), atol=1e-2)
    budget = plan(params(extract={"noise_mode": "mean"}), count_flops=False)
    assert not [r for r in budget.rows if r.stage == "invert"]
    add = plan(params(extract={"noise_mode": "add"}), count_flops=False)
    assert [r.bytes for r in budget.rows] == [r.bytes for r in add.rows]
    # check_params: any timestep for it, where trajectory takes only the inversion's steps.
    schedule = config("invert", InvertConfig).inversion().unet_timesteps()
    off = [next(t for t in range(1, 999) if t not in schedule)]
    check_all(params(extract={"noise_mode": "mean"}, timesteps=off))
    with pytest.raises(ConfigError, match="not on the inversion schedule"):
        check_all(params(extract={"noise_mode": "trajectory"}, timesteps=off))
    with pytest.raises(ConfigError, match="extract.noise_mode: unknown noise mode 'means'"):
        config("extract", ExtractConfig, noise_mode="means")
