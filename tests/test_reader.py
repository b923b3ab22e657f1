"""FeatureDataset: full samples, labels follow, DataLoader workers, int8/PCA transparent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import RESOLUTION, config, make_encoded, store_model
from torch.utils.data import DataLoader

from pipeline.cache.encoded import open_labels, open_latents, read_index, read_prompts
from pipeline.cache.reader import FeatureDataset, select_indices, tap_specs
from pipeline.diffusion.model import load_diffusion_model
from pipeline.loops.extract import ExtractConfig, extract_store

N = 6


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    store_model(root / "model")
    model = load_diffusion_model(root / "model")
    enc = root / "encoded"
    make_encoded(enc, model, N, prompts=("", "a foggy street"))
    prompts = read_prompts(enc)
    paths = {}
    for t, storage in ((50, "fp16"), (150, "int8"), (250, "pca-4")):
        cfg = config("extract", ExtractConfig, batch_size=4, storage=storage, images_per_shard=4,
                     taps="hyperfeatures")  # fmt: skip
        out = root / f"t{t}"
        extract_store(
            model, open_latents(enc), read_index(enc), prompts, t, out, cfg, "fp32", progress=False
        )
        paths[storage] = out
    return root, paths


def test_full_samples_and_tap_specs(stores):
    root, paths = stores
    ds = FeatureDataset(list(paths.values()), encoded_dir=root / "encoded", variant=1)
    specs = tap_specs(list(paths.values()))
    sample = ds[2]
    assert set(sample["features"]) == set(specs) and sample["index"] == 2
    for key, (channels, stride) in specs.items():
        f = sample["features"][key]
        # Stored precision: float16 (fp16, PCA); int8 arrives de-quantised as float32.
        assert f.dtype == (torch.float32 if key.startswith("t150/") else torch.float16)
        assert f.shape == (channels, RESOLUTION[0] // stride, RESOLUTION[1] // stride)
    assert specs["t250/up0_res0"][0] == 4  # PCA space is kept (k channels)
    assert specs["t50/up0_res0"][0] == 16 and specs["t150/up1_res2"] == (8, 8)
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == RESOLUTION
    np.testing.assert_array_equal(sample["label"].numpy(), open_labels(root / "encoded")[2])
    # Variants differ (another prompt), int8 de-quantises near the fp16 scale of the values.
    v0 = FeatureDataset([paths["int8"]], encoded_dir=root / "encoded", variant=0)[2]
    assert not torch.equal(v0["features"]["t150/up1_res0"], sample["features"]["t150/up1_res0"])
    assert sample["features"]["t150/up1_res0"].abs().max() > 1e-3


def test_dataloader_workers_and_domain_filter(stores):
    root, paths = stores
    index = read_index(root / "encoded")
    real = select_indices(index, domains="real")
    assert real == [4, 5]
    ds = FeatureDataset([paths["fp16"]], real, encoded_dir=root / "encoded", variant=1)
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    batches = list(loader)
    assert [int(b["index"]) for b in batches] == real
    assert batches[0]["features"]["t50/up0_res0"].shape == (1, 16, 2, 4)
    assert batches[0]["label"].shape == (1, *RESOLUTION)
