"""FeatureDataset: crops equal slices of full reads, labels follow, workers, int8/PCA transparent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from store_helpers import RESOLUTION, make_encoded, tiny_model
from torch.utils.data import DataLoader

from pipeline.diffusion import load_diffusion_model
from pipeline.encoded import PROMPTS_NAME, open_labels, open_latents, read_index, read_prompts
from pipeline.errors import StoreError
from pipeline.extract import ExtractConfig, extract_store
from pipeline.reader import FeatureDataset, select_indices, tap_specs

N = 6


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    tiny_model(root / "model")
    model = load_diffusion_model(root / "model")
    enc = root / "encoded"
    make_encoded(enc, model, N, prompts=("", "a foggy street"))
    prompts, embeds, _ = read_prompts(enc / PROMPTS_NAME)
    paths = {}
    for t, storage in ((50, "fp16"), (150, "int8"), (250, "pca-4")):
        cfg = ExtractConfig(batch_size=4, storage=storage, images_per_shard=4, taps="hyperfeatures")
        out = root / f"t{t}"
        extract_store(
            model, open_latents(enc), read_index(enc), prompts, embeds, t, out, cfg, progress=False
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


def test_crops_and_flips_equal_slices_of_full_reads(stores):
    root, paths = stores
    full = FeatureDataset(list(paths.values()), encoded_dir=root / "encoded")
    crop = FeatureDataset(
        list(paths.values()), encoded_dir=root / "encoded", crop=(16, 32), flip=True
    )
    assert crop.max_stride == 16
    specs = tap_specs(list(paths.values()))
    seen_flip = seen_offset = False
    torch.manual_seed(0)
    for _ in range(12):
        i = int(torch.randint(0, N, ()).item())
        c, f = crop[i], full[i]
        lab_c, lab_f = c["label"].numpy(), f["label"].numpy()
        # Locate the window through the label, then check every feature map against it.
        for y0 in range(0, RESOLUTION[0] - 16 + 1, 16):
            for x0 in range(0, RESOLUTION[1] - 32 + 1, 16):
                win = lab_f[y0 : y0 + 16, x0 : x0 + 32]
                for flipped in (False, True):
                    if np.array_equal(win[:, ::-1] if flipped else win, lab_c):
                        match = (y0, x0, flipped)
        y0, x0, flipped = match
        seen_flip |= flipped
        seen_offset |= (y0, x0) != (0, 0)
        for key, (_, s) in specs.items():
            ref = f["features"][key][:, y0 // s : (y0 + 16) // s, x0 // s : (x0 + 32) // s]
            ref = ref.flip(-1) if flipped else ref
            torch.testing.assert_close(c["features"][key], ref, rtol=0, atol=0)
    assert seen_flip and seen_offset
    with pytest.raises(StoreError, match="multiples of the largest stride"):
        FeatureDataset(list(paths.values()), encoded_dir=root / "encoded", crop=(8, 32))


def test_dataloader_workers_and_domain_filter(stores):
    root, paths = stores
    index = read_index(root / "encoded")
    real = select_indices(index, domains="real")
    assert real == [4, 5]
    ds = FeatureDataset([paths["fp16"]], real, encoded_dir=root / "encoded", variant=None)
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    batches = list(loader)
    assert [int(b["index"]) for b in batches] == real
    assert batches[0]["features"]["t50/up0_res0"].shape == (1, 16, 2, 4)
    assert batches[0]["label"].shape == (1, *RESOLUTION)
