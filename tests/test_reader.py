"""FeatureDataset: full samples, labels follow, DataLoader workers, int8/PCA transparent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import RESOLUTION, config, extract, make_encoded, store_model
from torch.utils.data import DataLoader

from pipeline.cache.encoded import domain_rows, open_labels, read_index
from pipeline.cache.reader import FeatureDataset, tap_specs
from pipeline.diffusion.model import load_diffusion_model
from pipeline.loops.extract import ExtractConfig

N = 6


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    store_model(root / "model")
    model = load_diffusion_model(root / "model")
    enc = root / "encoded"
    make_encoded(enc, model, N, prompts=("", "a foggy street"))
    paths = {}
    for t, storage in ((50, "fp16"), (150, "int8"), (250, "pca-4")):
        cfg = config(
            "extract",
            ExtractConfig,
            batch_size=4,
            storage=storage,
            images_per_shard=4,
            taps="hyperfeatures",
        )
        paths[storage] = root / f"t{t}"
        extract(model, enc, t, paths[storage], cfg)
    return root, paths


def test_full_samples_and_tap_specs(stores):
    root, paths = stores
    ds = FeatureDataset(
        list(paths.values()), encoded_dir=root / "encoded", domain="game", variant=1
    )
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
    assert sample["label"].dtype == torch.uint8 and sample["label"].shape == RESOLUTION
    np.testing.assert_array_equal(sample["label"].numpy(), open_labels(root / "encoded", "game")[2])
    # Variants differ (another prompt), int8 de-quantises near the fp16 scale of the values.
    v0 = FeatureDataset([paths["int8"]], encoded_dir=root / "encoded", domain="game")[2]
    assert not torch.equal(v0["features"]["t150/up1_res0"], sample["features"]["t150/up1_res0"])
    assert sample["features"]["t150/up1_res0"].abs().max() > 1e-3


def test_dataloader_workers_and_only_the_keys_asked(stores):
    root, paths = stores
    train = domain_rows(read_index(root / "encoded"), "game", "train")
    assert train == [0, 1, 2, 3]
    ds = FeatureDataset(
        [paths["fp16"]], train[1:3], encoded_dir=root / "encoded", domain="game", variant=1
    )
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    batches = list(loader)
    assert [int(b["index"]) for b in batches] == [1, 2]
    assert batches[0]["features"]["t50/up0_res0"].shape == (1, 16, 2, 4)
    assert batches[0]["label"].shape == (1, *RESOLUTION)
    # Reader threads (in worker processes too) read the same values as one thread.
    threaded = FeatureDataset(
        list(paths.values()), train, encoded_dir=root / "encoded", domain="game", threads=3
    )
    single = FeatureDataset(
        list(paths.values()), train, encoded_dir=root / "encoded", domain="game"
    )
    for a, b in zip(DataLoader(threaded, num_workers=2), DataLoader(single), strict=True):
        assert list(a["features"]) == list(b["features"])
        assert all(torch.equal(a["features"][k], b["features"][k]) for k in a["features"])
        assert torch.equal(a["label"], b["label"])


def test_keys_limit_what_is_read(stores):
    root, paths = stores
    keys = ["t50/up0_res0", "t150/up1_res0"]
    ds = FeatureDataset(
        list(paths.values()), encoded_dir=root / "encoded", domain="game", keys=keys
    )
    assert sorted(ds[0]["features"]) == sorted(keys)
