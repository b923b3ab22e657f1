"""FeatureStore: identity checks, atomic create, whole-shard writes, done mask, storage modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import identity

from pipeline.cache.storage import fit_pca, parse_storage, project_pca, quantize_int8
from pipeline.cache.store import FeatureStore, StoreIdentity
from pipeline.core.errors import StoreError

SHAPES = {"a": (6, 4, 8), "b": (3, 2, 4)}
STRIDES = {"a": 8, "b": 16}


def shard_data(store: FeatureStore, shard: int, seed: int = 0) -> dict[str, np.ndarray]:
    s0, s1 = store.shard_range(shard)
    rng = np.random.default_rng(seed + shard)
    V = store.identity.n_variants
    return {
        t: rng.standard_normal((s1 - s0, V, *store.stored_shape(t))).astype(np.float16)
        for t in store.taps
    }


def test_identity_round_trip_and_mismatch_names_fields(tmp_path):
    ident = identity()
    assert StoreIdentity.from_attrs(ident.to_attrs()) == ident
    FeatureStore.create(tmp_path / "t50", ident, 5, SHAPES, STRIDES, images_per_shard=2)
    FeatureStore.open(tmp_path / "t50", ident)  # same identity: fine
    other = dataclasses.replace(ident, timestep=51, storage="int8")
    with pytest.raises(StoreError, match="timestep.*storage|storage.*timestep") as err:
        FeatureStore.open(tmp_path / "t50", other)
    assert "model_fingerprint" not in str(err.value)
    with pytest.raises(StoreError, match="prompts"):
        FeatureStore.open(tmp_path / "t50", dataclasses.replace(ident, prompts=("", "fog")))


def test_create_is_atomic_and_refuses_existing(tmp_path):
    path = tmp_path / "t50"
    with pytest.raises(StoreError, match="projections"):
        # PCA without projections fails half-way through validation: nothing may remain.
        FeatureStore.create(path, identity(storage="pca-2"), 5, SHAPES, STRIDES)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    FeatureStore.create(path, identity(), 5, SHAPES, STRIDES)
    with pytest.raises(StoreError, match="already exists"):
        FeatureStore.create(path, identity(), 5, SHAPES, STRIDES)
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "nothing")


def test_whole_shards_done_mask_and_layout(tmp_path):
    ident = identity(prompts=("", "fog"), draws=2)
    store = FeatureStore.create(tmp_path / "s", ident, 5, SHAPES, STRIDES, images_per_shard=2)
    arr = store.group["features/a"]
    assert arr.shape == (5, 4, 6, 4, 8) and arr.chunks == (1, 1, 6, 4, 8)
    assert arr.shards == (2, 4, 6, 4, 8) and arr.dtype == np.float16
    assert store.n_shards == 3 and store.missing_shards() == [0, 1, 2]
    last = shard_data(store, 2)  # the last shard holds a single image
    store.write_shard(2, last)
    assert store.missing_shards() == [0, 1]
    with pytest.raises(StoreError, match="shape"):
        store.write_shard(0, last)  # one image where the shard holds two
    with pytest.raises(StoreError, match="taps"):
        store.write_shard(0, {"a": shard_data(store, 0)["a"]})
    assert store.missing_shards() == [0, 1]  # rejected writes never mark a shard done
    reopened = FeatureStore.open(tmp_path / "s", ident)
    np.testing.assert_array_equal(
        reopened.read("b", 4, variant=3), last["b"][0, 3].astype(np.float32)
    )
    # One file per shard (not per image): what DVC hashes stays small.
    files = list((tmp_path / "s" / "features" / "a").rglob("c/*/*/*/*/*"))
    assert len(files) == 1


def test_int8_round_trip_error_is_bounded(tmp_path):
    x = torch.randn(3, 6, 4, 8) * torch.linspace(0.01, 10, 6)[None, :, None, None]
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 6)
    ident = identity(storage="int8", taps=("a",))
    store = FeatureStore.create(tmp_path / "q", ident, 3, {"a": (6, 4, 8)}, {"a": 8}, 4)
    store.write_shard(0, {"a": q.numpy()[:, None]}, {"a": scale.numpy()[:, None]})
    for i in range(3):
        back = store.read("a", i)
        err = np.abs(back - x[i].numpy()).max(axis=(1, 2))
        # Per-channel scales: each channel's error is at most half its own step.
        assert np.all(err <= scale[i].numpy() / 2 + 1e-6)
    with pytest.raises(StoreError, match="scales"):
        store.write_shard(0, {"a": q.numpy()[:, None]})


def test_pca_projection_is_stored_and_keeps_most_variance(tmp_path):
    rng = np.random.default_rng(0)
    # 6 channels that really live in a 2-D subspace plus a little noise.
    basis = rng.standard_normal((2, 6))
    pixels = rng.standard_normal((3000, 2)) @ basis + 0.01 * rng.standard_normal((3000, 6))
    comp, mean = fit_pca(pixels.astype(np.float32), k=2, batch_size=500)
    assert comp.shape == (2, 6) and mean.shape == (6,)
    x = torch.from_numpy((rng.standard_normal((2, 4 * 8, 2)) @ basis).astype(np.float32))
    x = x.permute(0, 2, 1).reshape(2, 6, 4, 8)
    y = project_pca(x, torch.from_numpy(comp), torch.from_numpy(mean))
    recon = (
        torch.einsum("kc,bkhw->bchw", torch.from_numpy(comp), y)
        + torch.from_numpy(mean)[:, None, None]
    )
    assert torch.allclose(recon, x, atol=0.1)
    ident = identity(storage="pca-2", taps=("a",))
    store = FeatureStore.create(
        tmp_path / "p", ident, 2, {"a": (6, 4, 8)}, {"a": 8}, 2, {"a": (comp, mean)}
    )
    assert store.stored_shape("a") == (2, 4, 8) and store.tap_info["a"]["model_channels"] == 6
    np.testing.assert_array_equal(store.projection("a")[0], comp)


def test_storage_mode_parsing():
    assert parse_storage("pca-16").k == 16 and parse_storage("int8").dtype == np.int8
    for bad in ("pca", "pca-0", "fp8"):
        with pytest.raises(StoreError, match="storage mode"):
            parse_storage(bad)


@pytest.mark.parametrize("storage", ["fp16", "int8"])
def test_direct_shard_files_equal_zarr(tmp_path, storage):
    ident = identity(storage=storage, prompts=("", "fog"), draws=2)  # V = 4 variants
    store = FeatureStore.create(tmp_path / "t50", ident, 7, SHAPES, STRIDES, images_per_shard=3)
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}
    for shard in (0, 2):  # shard 1 (images 3-5) stays unwritten: fill value; 2 is an edge shard
        s0, s1 = store.shard_range(shard)
        feats = {
            t: torch.from_numpy(rng.standard_normal((s1 - s0, 4, *store.stored_shape(t))))
            for t in store.taps
        }
        scales = None
        if storage == "int8":
            q = {t: quantize_int8(x.flatten(0, 1).float()) for t, x in feats.items()}
            scales = {t: s.reshape(s1 - s0, 4, -1).numpy() for t, (_, s) in q.items()}
            feats = {t: x.reshape(s1 - s0, 4, *x.shape[1:]) for t, (x, _) in q.items()}
        arrays = {t: x.numpy().astype(store.storage.dtype) for t, x in feats.items()}
        if shard == 0:  # written by our shard writer
            store.write_shard(shard, arrays, scales)
        else:  # written by zarr itself
            for t in store.taps:
                store.group[f"features/{t}"][s0:s1] = arrays[t]
                if scales is not None:
                    store.group[f"scales/{t}"][s0:s1] = scales[t]
        for t in store.taps:
            x = arrays[t].astype(np.float32)
            if scales is not None:
                x = x * scales[t].astype(np.float32)[..., None, None]
            written[f"{t}/{shard}"] = x
    direct = FeatureStore.open(tmp_path / "t50", ident)  # read-only: direct chunk reads
    via_zarr = FeatureStore.open(tmp_path / "t50", ident, mode="r+")  # zarr's pipeline
    assert direct._chunk_reader("features/a") is not None
    assert via_zarr._chunk_reader("features/a") is None
    window = (slice(1, 2), slice(1, 3))
    for tap in store.taps:
        for i in range(7):
            for v in range(4):
                for w in (None, window):
                    a, b = direct.read(tap, i, v, w), via_zarr.read(tap, i, v, w)
                    assert np.array_equal(a, b), (tap, i, v, w)
                    assert a.dtype == (np.float32 if storage == "int8" else np.float16)
                shard, pos = divmod(i, 3)
                if shard != 1:
                    assert np.array_equal(direct.read(tap, i, v), written[f"{tap}/{shard}"][pos, v])
    assert not direct.read("a", 4, 1).any()  # never written
    # A damaged shard index is an error naming the file, never silently wrong values.
    shard_file = tmp_path / "t50" / "features" / "b" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-10] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="c/0/0/0/0/0: shard index checksum"):
        FeatureStore.open(tmp_path / "t50", ident).read("b", 1, 0)
