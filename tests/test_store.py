"""FeatureStore: identity checks, atomic create, whole-shard writes, done mask, storage modes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import identity as _identity

from pipeline.cache.reader import FeatureReader
from pipeline.cache.storage import (
    dequantize_int8,
    fit_pca,
    parse_storage,
    project_pca,
    quantize_int8,
)
from pipeline.cache.store import FeatureStore, StoreIdentity, scales_name, slot, values_name
from pipeline.core.errors import StoreError

# a and c share a shape: one array (group s8c6) holds both on its tap axis; b is alone.
SHAPES = {"a": (6, 4, 8), "b": (3, 2, 4), "c": (6, 4, 8)}
STRIDES = {"a": 8, "b": 16, "c": 8}


def identity(**kw):
    """helpers.identity with this file's three taps."""
    return _identity(**{"taps": tuple(SHAPES), **kw})


def where(store: FeatureStore, tap: str) -> tuple[str, int]:
    """(its group's values array, its place on the tap axis)."""
    return values_name(store.tap_info[tap]["group"]), store.tap_info[tap]["index"]


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
    assert store.groups == ["s8c6", "s16c3"] and store.group_taps("s8c6") == ["a", "c"]
    arr = store.group["features/s8c6/values"]
    assert arr.metadata.dimension_names == ("image", "variant", "tap", "channel", "y", "x")
    assert arr.shape == (5, 4, 2, 6, 4, 8) and arr.chunks == (1, 1, 2, 6, 4, 8)
    assert arr.shards == (2, 4, 2, 6, 4, 8) and arr.dtype == np.float16
    assert store.group["features/s8c6"].attrs["taps"] == ["a", "c"]
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
    for tap in ("a", "b", "c"):
        np.testing.assert_array_equal(
            reopened.read(tap, 4, variant=3), last[tap][0, 3].astype(np.float32)
        )
    # One file per shard and group (not per image or tap), side by side in one folder: what
    # DVC walks, hashes and links stays small.
    files = [p.name for p in (tmp_path / "s" / "features" / "s8c6" / "values").iterdir()]
    assert sorted(files) == ["c.2.0.0.0.0.0", "zarr.json"]


def test_int8_round_trip_error_is_bounded(tmp_path):
    x = torch.randn(3, 6, 4, 8) * torch.linspace(0.01, 10, 6)[None, :, None, None]
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 6)
    ident = identity(storage="int8", taps=("a",))
    store = FeatureStore.create(tmp_path / "q", ident, 3, {"a": (6, 4, 8)}, {"a": 8}, 4)
    store.write_shard(0, {"a": q.numpy()[:, None]}, scales={"a": scale.numpy()[:, None]})
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


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("storage", ["fp16", "int8"])
def test_direct_shard_files_equal_zarr(tmp_path, storage, compression):
    ident = identity(storage=storage, prompts=("", "fog"), draws=2, compression=compression)
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
            store.write_shard(shard, arrays, scales=scales)
        else:  # written by zarr itself, which the direct reader must read the same
            for t in store.taps:
                name, k = where(store, t)
                store.group[name][s0:s1, :, k] = arrays[t]
                if scales is not None:
                    store.group[name.replace("values", "scales")][s0:s1, :, k] = scales[t]
        for t in store.taps:
            x = arrays[t].astype(np.float32)
            if scales is not None:
                x = x * scales[t].astype(np.float32)[..., None, None]
            written[f"{t}/{shard}"] = x
    direct = FeatureStore.open(tmp_path / "t50", ident)
    group = zarr.open_group(tmp_path / "t50", mode="r")  # zarr's own codec pipeline
    window = (slice(1, 2), slice(1, 3))
    for tap in store.taps:
        name, k = where(store, tap)
        via_zarr = np.asarray(group[name][:, :, k]).astype(np.float32)
        if storage == "int8":
            scales_of = np.asarray(group[name.replace("values", "scales")][:, :, k])
            via_zarr = via_zarr * scales_of[..., None, None]
        for i in range(7):
            for v in range(4):
                assert np.array_equal(direct.read(tap, i, v), via_zarr[i, v]), (tap, i, v)
                assert np.array_equal(
                    direct.read(tap, i, v, window), via_zarr[i, v][:, window[0], window[1]]
                )
                shard, pos = divmod(i, 3)
                if shard != 1:
                    assert np.array_equal(direct.read(tap, i, v), written[f"{tap}/{shard}"][pos, v])
    assert not direct.read("a", 4, 1).any()  # never written
    # A row's chunks in one call (what FeatureReader reads), in order and out of it, the same
    rows = FeatureStore.open(tmp_path / "t50")
    order = [(i, v) for i in range(7) for v in range(4)]
    for i, v in order + order[::-1]:
        got = rows.read_row(store.taps, i, v)
        for g, t in zip(got, store.taps, strict=True):
            if storage == "int8":  # int8 values and scales, for the device to decode
                q, s = direct.read(t, i, v, decode=False)
                assert np.array_equal(g[0], q) and np.array_equal(g[1], s)
                g = dequantize_int8(*g)
            assert np.array_equal(g, direct.read(t, i, v))
    with pytest.raises(StoreError, match="image 7 variant 0 out of range"):
        rows.read_row(store.taps, 7, 0)
    with pytest.raises(StoreError, match="variant 4 out of range"):
        rows.read_row(store.taps, 0, 4)


def test_slot_is_where_zarr_itself_puts_each_image_variant(tmp_path):
    """`slot` is the store's layout: written by zarr-python, chunk `slot` of shard file `shard`
    holds that (image, variant), for values and (slot // variants) for int8 scales."""
    ident = identity(storage="int8", prompts=("", "fog"), draws=2)
    store = FeatureStore.create(tmp_path / "t50", ident, 7, SHAPES, STRIDES, images_per_shard=3)
    rng = np.random.default_rng(1)
    for g in store.groups:
        shape = store.group[values_name(g)].shape
        store.group[values_name(g)][:] = rng.integers(-127, 128, shape, dtype=np.int8)
        store.group[scales_name(g)][:] = rng.random(shape[:4], np.float32)
    group = zarr.open_group(tmp_path / "t50", mode="r")
    seen = set()
    for g in store.groups:
        values, scales = store.array_files(values_name(g)), store.array_files(scales_name(g))
        for i in range(7):
            for v in range(4):
                shard, local = slot(i, v, 3, 4)
                seen.add((shard, local))
                assert values.shard_file((shard, 0, 0, 0, 0, 0)).is_file()
                got = values.read_local((shard, 0, 0, 0, 0, 0), local)[0, 0]
                assert np.array_equal(got, group[values_name(g)][i, v]), (g, i, v)
                got = scales.read_local((shard, 0, 0, 0), local // 4)[0, v]
                assert np.array_equal(got, group[scales_name(g)][i, v]), (g, i, v)
    assert len(seen) == 28 and {s for s, _ in seen} == {0, 1, 2}


def flip_byte(path: Path, offset: int) -> None:
    """Flip one byte of a file in place (what a failing disk or a stray write does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def full_store(path: Path, storage: str = "fp16", compression: str = "none") -> FeatureStore:
    """A complete store of random values: 3 shards of 2 images (the last holds one)."""
    store = FeatureStore.create(
        path,
        identity(storage=storage, compression=compression),
        5,
        SHAPES,
        STRIDES,
        images_per_shard=2,
    )
    for shard in range(store.n_shards):
        feats = shard_data(store, shard)
        scales = None
        if storage == "int8":
            feats = {t: (x * 10).astype(np.int8) for t, x in feats.items()}
            scales = {t: np.ones(x.shape[:3], np.float32) for t, x in feats.items()}
        store.write_shard(shard, feats, scales=scales)
    return FeatureStore.open(path)


def read_all(path: Path) -> dict:
    store = FeatureStore.open(path)
    return {(t, i): store.read(t, i) for t in store.taps for i in range(store.n_images)}


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_a_flipped_byte_in_any_chunk_is_a_clear_error_in_every_reader(tmp_path, compression):
    full_store(tmp_path / "s", compression=compression)
    files = FeatureStore.open(tmp_path / "s").tap_file("b")
    shard_file = files.shard_file((1, 0, 0, 0, 0, 0))
    index = np.frombuffer(shard_file.read_bytes()[-36:-4], "<u8").reshape(2, 2)
    for local, (offset, length) in enumerate(index):  # every chunk, header and payload
        for at in (int(offset), int(offset + length // 2), int(offset + length - 1)):
            clean = shard_file.read_bytes()
            flip_byte(shard_file, at)
            image = 2 + local
            with pytest.raises(StoreError) as err:  # the project's reader
                FeatureStore.open(tmp_path / "s").read("b", image)
            msg = str(err.value)
            assert "array features/s16c3/values" in msg and str(shard_file) in msg
            assert str(tmp_path / "s") in msg and "\n" not in msg
            with pytest.raises(ValueError, match="checksum"):  # zarr-python itself
                zarr.open_group(tmp_path / "s", mode="r")[values_name("s16c3")][image]
            ds = FeatureReader([tmp_path / "s"], labels=False, encoded_dir=tmp_path, set_name="x")
            with pytest.raises(StoreError, match="crc32c"):  # train / evaluate's reader
                ds.features(image)
            shard_file.write_bytes(clean)
    FeatureStore.open(tmp_path / "s").read("b", 2)  # restored: fine again


def test_verify_lists_exactly_the_bad_shards_and_extract_style_repair(tmp_path):
    store = full_store(tmp_path / "s", storage="int8")
    original = read_all(tmp_path / "s")
    bytes_before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert store.verify() == []
    bad_values = store.tap_file("b").shard_file((0, 0, 0, 0, 0, 0))
    bad_scales = store.array_files(scales_name("s8c6")).shard_file((2, 0, 0, 0))
    flip_byte(bad_values, 3)
    flip_byte(bad_scales, 0)
    gone = store.tap_file("a").shard_file((1, 0, 0, 0, 0, 0))
    gone.unlink()
    found = FeatureStore.open(tmp_path / "s").verify()
    assert [(s, p) for s, p, _ in found] == [(0, bad_values), (1, gone), (2, bad_scales)]
    assert "missing" in found[1][2] and "checksum" in found[0][2]
    with pytest.raises(StoreError, match="missing, but the store's done mask"):
        FeatureStore.open(tmp_path / "s").read("a", 2)  # never zeros
    # The repair extract does: delete the bad files, forget their shards, write them again.
    for _, p, _ in found:
        p.unlink(missing_ok=True)
    writer = FeatureStore.open(tmp_path / "s", mode="r+")
    assert writer.forget_missing() == [0, 1, 2] and writer.missing_shards() == [0, 1, 2]
    for shard in writer.missing_shards():
        feats = {t: (x * 10).astype(np.int8) for t, x in shard_data(writer, shard).items()}
        writer.write_shard(
            shard, feats, scales={t: np.ones(x.shape[:3], np.float32) for t, x in feats.items()}
        )
    assert FeatureStore.open(tmp_path / "s").verify() == []
    repaired = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert repaired == bytes_before  # bit for bit
    after = read_all(tmp_path / "s")
    assert all(np.array_equal(after[k], original[k]) for k in original)


def test_damaged_index_header_and_truncation_are_one_line_naming_the_file(tmp_path):
    full_store(tmp_path / "s", compression="lz4")
    files = FeatureStore.open(tmp_path / "s").tap_file("b")
    shard_file = files.shard_file((0, 0, 0, 0, 0, 0))
    clean = shard_file.read_bytes()
    flip_byte(shard_file, len(clean) - 10)  # the shard index
    with pytest.raises(StoreError, match="shard index fails its crc32c"):
        FeatureStore.open(tmp_path / "s").read("b", 1)
    shard_file.write_bytes(clean[: len(clean) // 2] + clean[-36:])  # a chunk cut short
    with pytest.raises(StoreError, match="truncated"):
        FeatureStore.open(tmp_path / "s").read("b", 1)
    shard_file.write_bytes(clean[:10])
    with pytest.raises(StoreError, match=str(shard_file)):
        FeatureStore.open(tmp_path / "s").read("b", 0)


def test_xarray_sees_named_axes_and_the_readers_values(tmp_path):
    xr = pytest.importorskip("xarray")
    store = full_store(tmp_path / "s", storage="int8")
    tree = xr.open_datatree(tmp_path / "s", engine="zarr", consolidated=False)
    node = tree["features/s8c6"].to_dataset()
    assert node["values"].dims == ("image", "variant", "tap", "channel", "y", "x")
    assert node["scales"].dims == ("image", "variant", "tap", "channel")
    assert node.attrs["stride"] == 8 and node.attrs["storage"] == "int8"
    decoded = (node["values"].astype("float32") * node["scales"]).transpose(*node["values"].dims)
    for k, tap in enumerate(node.attrs["taps"]):  # every tap of the group, by its name
        for i in range(store.n_images):
            got = decoded.isel(image=i, variant=0, tap=k).values
            np.testing.assert_array_equal(got, store.read(tap, i))
    assert tree.attrs["identity"]["timestep"] == 50
    assert bool(tree["done"].all())
    fp16 = full_store(tmp_path / "f")
    ds = xr.open_zarr(tmp_path / "f", group="features/s16c3", consolidated=False)
    got = ds["values"].isel(image=4, variant=0, tap=0).values
    np.testing.assert_array_equal(got, fp16.read("b", 4))


@pytest.mark.parametrize("storage", ["fp16", "int8", "pca-2-int8"])
def test_zarr_python_tensorstore_and_the_reader_read_every_tap_alike(tmp_path, storage):
    """Standard readers read each tap as values[:, :, index] of its group, decoded by the
    group's `decode` attribute, equal to the project's reader."""
    ts = pytest.importorskip("tensorstore")
    projections = None
    if storage.startswith("pca"):
        rng = np.random.default_rng(3)
        projections = {
            t: (rng.standard_normal((2, c)).astype(np.float32), rng.random(c).astype(np.float32))
            for t, (c, _, _) in SHAPES.items()
        }
    ident = identity(storage=storage, prompts=("", "fog"))
    store = FeatureStore.create(tmp_path / "s", ident, 5, SHAPES, STRIDES, 2, projections)
    rng = np.random.default_rng(4)
    for shard in range(store.n_shards):
        s0, s1 = store.shard_range(shard)
        shape = {t: (s1 - s0, 2, *store.stored_shape(t)) for t in store.taps}
        if "scales" in store.storage.parts(1):  # int8 or pca-k-int8
            feats = {t: rng.integers(-127, 128, shape[t], dtype=np.int8) for t in store.taps}
            scales = {t: rng.random(shape[t][:3], np.float32) for t in store.taps}
        else:
            feats = {t: rng.standard_normal(shape[t]).astype(np.float16) for t in store.taps}
            scales = None
        store.write_shard(shard, feats, scales=scales)
    group = zarr.open_group(tmp_path / "s", mode="r")
    for tap in store.taps:
        name, k = where(store, tap)
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(tmp_path / "s" / name)},
        }
        via_ts = ts.open(spec, read=True).result()[:, :, k].read().result()
        via_zarr = np.asarray(group[name][:, :, k])
        np.testing.assert_array_equal(via_ts, via_zarr)
        if "scales" in store.storage.parts(1):  # int8 or pca-k-int8
            spec["kvstore"]["path"] = str(tmp_path / "s" / name.replace("values", "scales"))
            scales_ts = ts.open(spec, read=True).result()[:, :, k].read().result()
            via_ts = via_ts.astype(np.float32) * scales_ts[..., None, None]
        for i in range(5):
            for v in range(2):
                got = store.read(tap, i, v)  # PCA: the coefficients, as train reads them
                np.testing.assert_array_equal(via_ts[i, v], got)
        if projections is not None:
            comp = np.asarray(group[name.replace("values", "components")][k])
            np.testing.assert_array_equal(comp, projections[tap][0])


def test_the_content_digest_follows_the_stores_bytes(tmp_path):
    """Equal stores give equal digests (whatever their files' inodes and times); one changed
    shard gives another; an incomplete store has none."""
    a = full_store(tmp_path / "a").content_digest()
    assert full_store(tmp_path / "b").content_digest() == a
    assert set(a) == {"images", "images_per_shard", "identity", "content"}
    writer = FeatureStore.open(tmp_path / "b", mode="r+")
    feats = shard_data(writer, 1, seed=7)  # other values in shard 1
    writer.write_shard(1, feats)
    assert FeatureStore.open(tmp_path / "b").content_digest()["content"] != a["content"]
    writer.write_shard(1, shard_data(writer, 1))  # the original values again
    assert FeatureStore.open(tmp_path / "b").content_digest() == a
    writer.set_done(2, 0)
    with pytest.raises(StoreError, match="incomplete store"):
        FeatureStore.open(tmp_path / "b").content_digest()
