"""FeatureReader: full samples, labels follow, DataLoader workers, int8/PCA transparent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import RESOLUTION, config, extract, make_encoded, shard_mb, store_model
from torch.utils.data import DataLoader

from pipeline.cache.encoded import open_labels, read_index, split_rows
from pipeline.cache.reader import FeatureReader, tap_specs
from pipeline.cache.store import FeatureStore
from pipeline.core.errors import StoreError
from pipeline.core.names import FeatureKey
from pipeline.data.samples import Quantized, RowsDataset, collate, to_device
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
    for t, storage in ((50, "fp16"), (150, "int8"), (250, "pca-4"), (250, "pca-4-int8")):
        cfg = config(
            "extract",
            ExtractConfig,
            batch_size=4,
            storage=storage,
            shard_mb=shard_mb(4, model, "hyperfeatures", storage, variants=2),
            taps="hyperfeatures",
        )
        paths[storage] = root / storage / f"t{t}"
        extract(model, enc, t, paths[storage], cfg)
    return root, paths


def test_full_samples_and_tap_specs(stores):
    root, paths = stores
    combined = [paths[s] for s in ("fp16", "int8", "pca-4")]  # one store per timestep
    ds = FeatureReader(combined, encoded_dir=root / "encoded", set_name="game")
    specs = tap_specs(combined)
    features = ds.features(2, 1)
    assert set(features) == set(specs)
    decoded = to_device(features, "cpu")
    for key, (channels, stride) in specs.items():
        f = features[key]
        shape = (channels, RESOLUTION[0] // stride, RESOLUTION[1] // stride)
        # As stored: float16 (fp16, PCA); int8 values and their scales, decoded on the device
        # to exactly what the store's own reader decodes.
        if key.startswith("t150/"):
            assert isinstance(f, Quantized) and f.values.dtype == torch.int8
            assert f.values.shape == shape and f.scales.shape == (channels,)
            store = FeatureStore.open(paths["int8"])
            want = store.read(FeatureKey.parse(key).tap, 2, 1)
            assert decoded[key].dtype == torch.float32
            assert torch.equal(decoded[key], torch.from_numpy(want))
        else:
            assert f.dtype == torch.float16 and f.shape == shape
    assert specs["t250/up0_res0"][0] == 4  # PCA space is kept (k channels)
    # PCA then int8: the same k coefficients within int8's rounding (1/127 of each max).
    quantized = FeatureReader([paths["pca-4-int8"]], encoded_dir=root / "encoded", set_name="game")
    pca = features["t250/up1_res0"].float()
    both = to_device(quantized.features(2, 1), "cpu")["t250/up1_res0"]
    assert both.dtype == torch.float32 and both.shape == pca.shape and not torch.equal(both, pca)
    bound = pca.abs().amax(dim=(1, 2))[:, None, None] / 127  # half a step, plus fp16's rounding
    assert ((both - pca).abs() <= bound / 2 + 2e-3 * pca.abs() + 1e-3).all()
    assert specs["t50/up0_res0"][0] == 16 and specs["t150/up1_res2"] == (8, 8)
    label = ds.label(2)
    assert label.dtype == torch.uint8 and label.shape == RESOLUTION
    np.testing.assert_array_equal(label.numpy(), open_labels(root / "encoded", "game")[2])
    # Variants differ (another prompt), int8 de-quantises near the fp16 scale of the values.
    v0 = FeatureReader([paths["int8"]], encoded_dir=root / "encoded", set_name="game").features(2)
    v0 = to_device(v0, "cpu")
    assert not torch.equal(v0["t150/up1_res0"], decoded["t150/up1_res0"])
    assert decoded["t150/up1_res0"].abs().max() > 1e-3


def test_dataloader_workers_and_only_the_keys_asked(stores):
    root, paths = stores
    name, train = split_rows(read_index(root / "encoded"), "game", "train")
    assert name == "game" and train == [0, 1, 2, 3]
    reader = FeatureReader([paths["fp16"]], encoded_dir=root / "encoded", set_name="game")
    loader = DataLoader(
        RowsDataset(reader, train[1:3]), batch_size=1, num_workers=2, collate_fn=collate
    )
    batches = list(loader)
    assert [int(b.index) for b in batches] == [1, 2]
    assert batches[0].features["t50/up0_res0"].shape == (1, 16, 2, 4)
    assert batches[0].label.shape == (1, *RESOLUTION)
    # Reader threads (in worker processes too) read the same values as one thread.
    kw = dict(encoded_dir=root / "encoded", set_name="game")
    every = [paths[s] for s in ("fp16", "int8", "pca-4")]  # one store per timestep
    with pytest.raises(StoreError, match="two stores of one timestep"):
        FeatureReader([*every, paths["pca-4-int8"]], **kw)
    threaded = RowsDataset(FeatureReader(every, threads=3, **kw), train)
    single = RowsDataset(FeatureReader(every, **kw), train)
    pairs = zip(
        DataLoader(threaded, num_workers=2, collate_fn=collate),
        DataLoader(single, collate_fn=collate),
        strict=True,
    )
    for a, b in pairs:
        assert list(a.features) == list(b.features)
        a_x, b_x = to_device(a.features, "cpu"), to_device(b.features, "cpu")
        assert all(torch.equal(a_x[k], b_x[k]) for k in a.features)
        assert torch.equal(a.label, b.label)


def test_keys_limit_what_is_read(stores):
    root, paths = stores
    keys = ["t50/up0_res0", "t150/up1_res0"]
    every = [paths[s] for s in ("fp16", "int8", "pca-4")]  # one store per timestep
    ds = FeatureReader(every, encoded_dir=root / "encoded", set_name="game", keys=keys)
    assert sorted(ds.features(0)) == sorted(keys)
