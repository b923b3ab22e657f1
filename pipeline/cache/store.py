"""The feature store: one Zarr v3 group per timestep, one sharded array per tap.

Its rules (identity, whole-shard writes, resume) are in docs/architecture.md, "The feature store".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.cache.shards import ShardedArrayFiles
from pipeline.cache.storage import StorageMode, dequantize_int8, parse_storage
from pipeline.core.errors import ConfigError, StoreError
from pipeline.core.fileio import atomic_path
from pipeline.core.params import validate

FORMAT_VERSION = 2  # 2: per-domain stores; noise and encoding identity fields
COMPRESSION = "blosc-lz4-5-bitshuffle"
# Whole shards go through zarr's codec pipeline in one batch instead of chunk by chunk.
_WRITE_CONFIG = {"codec_pipeline.batch_size": 256}


def _compressor() -> BloscCodec:
    # Measured on fp16 UNet features: lz4+bitshuffle compresses as well as zstd-3+shuffle
    # (~0.91 vs 0.93 of raw) at a fifth of the CPU time, which matters for extraction speed.
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


@dataclasses.dataclass(frozen=True)
class StoreIdentity:
    """Everything the stored values depend on; a store with another identity is never reused."""

    model_fingerprint: str
    taps: tuple[str, ...]  # tap names, in model order
    tap_modules: tuple[str, ...]  # module path of each tap
    timestep: int
    noise_seed: int
    noise_mode: str  # add | trajectory
    trajectory: str  # fingerprint of the inversion the latents come from ("" under add)
    conditioning: str  # single | diff
    encoding: str  # how the latents were encoded (draws, posterior, photometric, seed)
    images: str  # index_fingerprint of the images, in store order
    resolution: tuple[int, int]  # (H, W) fed to the VAE: the domain's canvas
    prompts: tuple[str, ...]  # prompt variant texts, in store order
    draws: int
    storage: str
    compute_dtype: str
    compression: str = COMPRESSION
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # Normalise JSON lists back to tuples so identities compare equal after a round trip.
        object.__setattr__(self, "taps", tuple(self.taps))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "tap_modules", tuple(self.tap_modules))
        object.__setattr__(self, "resolution", tuple(int(v) for v in self.resolution))
        parse_storage(self.storage)  # validates
        if self.draws < 1 or not self.prompts:
            raise StoreError(f"identity needs >= 1 draw and >= 1 prompt, got {self}")

    @property
    def n_variants(self) -> int:
        """V = prompt variants x noise draws; variant v = prompt v // draws, draw v % draws."""
        return len(self.prompts) * self.draws

    def to_attrs(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str = "identity") -> StoreIdentity:
        """Inverse of to_attrs; unknown or missing fields are an error (another format)."""
        try:
            return validate(dict(attrs), cls, "identity", where)
        except ConfigError as e:
            raise StoreError(str(e)) from None

    def differences(self, other: StoreIdentity) -> list[str]:
        """Names of the fields whose values differ, with both values."""
        a, b = self.to_attrs(), other.to_attrs()
        return [f"{k}: stored {a[k]!r} != expected {b[k]!r}" for k in a if a[k] != b[k]]


def timestep_dir(features_dir: str | os.PathLike[str], timestep: int) -> Path:
    """The output of extract@<timestep>: <features_dir>/t<timestep> (dvc.yaml's outs)."""
    return Path(features_dir) / f"t{int(timestep)}"


def store_path(features_dir: str | os.PathLike[str], timestep: int, domain: str) -> Path:
    """The store of one domain at one timestep: <features_dir>/t<timestep>/<domain>."""
    return timestep_dir(features_dir, timestep) / domain


class FeatureStore:
    """A feature group on disk: arrays features/<tap> (N, V, C, h, w), a per-shard `done` mask."""

    def __init__(self, path: Path, group: zarr.Group, read_only: bool = False) -> None:
        self.path = path
        self.group = group
        # Shards are written, and read-only stores read, straight from the files (pipeline.chunks).
        self.read_only = read_only
        self._arrays: dict[str, zarr.Array] = {}
        self._files: dict[str, ShardedArrayFiles | None] = {}
        attrs = dict(group.attrs)
        try:
            self.identity = StoreIdentity.from_attrs(attrs["identity"], str(path))
            self.n_images = int(attrs["n_images"])
            self.images_per_shard = int(attrs["images_per_shard"])
            self.tap_info: dict[str, dict[str, int]] = dict(attrs["taps"])
        except (KeyError, TypeError) as e:
            raise StoreError(f"{path}: not a feature store (bad attributes: {e})") from e
        self.storage: StorageMode = parse_storage(self.identity.storage)
        self.n_shards = -(-self.n_images // self.images_per_shard)

    # ---- creation / opening -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        identity: StoreIdentity,
        n_images: int,
        tap_shapes: Mapping[str, tuple[int, int, int]],
        tap_strides: Mapping[str, int],
        images_per_shard: int = 16,
        projections: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> FeatureStore:
        """Create the store at full size, atomically (it exists fully created or not at all).

        tap_shapes are the model's (C, h, w); with PCA storage `projections` gives per tap
        (components (k, C), mean (C,)) and the arrays hold k channels.
        """
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: already exists; remove it to create a new store")
        if n_images < 1 or images_per_shard < 1:
            raise StoreError(f"{path}: need n_images >= 1 and images_per_shard >= 1")
        if list(tap_shapes) != list(identity.taps) or set(tap_strides) != set(tap_shapes):
            raise StoreError(
                f"{path}: tap shapes {list(tap_shapes)} / strides {list(tap_strides)} do not "
                f"match identity taps {list(identity.taps)}"
            )
        for name in tap_shapes:
            if not name or "/" in name:
                raise StoreError(f"{path}: tap name {name!r} must be non-empty without '/'")
        mode = parse_storage(identity.storage)
        if mode.kind == "pca":
            missing = sorted(set(tap_shapes) - set(projections or {}))
            if missing:
                raise StoreError(f"{path}: PCA storage needs projections for taps {missing}")
        n_shards = -(-n_images // images_per_shard)
        V = identity.n_variants
        taps_attr: dict[str, dict[str, int]] = {}
        with atomic_path(path) as tmp:
            root = zarr.open_group(tmp, mode="w-", zarr_format=3)
            for name, (c, h, w) in tap_shapes.items():
                stored_c = c
                if mode.kind == "pca":
                    comp, mean = projections[name]  # type: ignore[index]
                    comp = np.asarray(comp, dtype=np.float32)
                    mean = np.asarray(mean, dtype=np.float32)
                    if comp.ndim != 2 or comp.shape[1] != c or mean.shape != (c,):
                        raise StoreError(
                            f"{path}: projection of {name} has shape {comp.shape}/{mean.shape},"
                            f" expected (k, {c})/({c},)"
                        )
                    stored_c = comp.shape[0]
                    root.create_array(f"pca/{name}/components", data=comp)
                    root.create_array(f"pca/{name}/mean", data=mean)
                root.create_array(
                    f"features/{name}",
                    shape=(n_images, V, stored_c, h, w),
                    chunks=(1, 1, stored_c, h, w),
                    shards=(images_per_shard, V, stored_c, h, w),
                    dtype=mode.dtype,
                    compressors=[_compressor()],
                    fill_value=0,
                )
                if mode.kind == "int8":
                    root.create_array(
                        f"scales/{name}",
                        shape=(n_images, V, stored_c),
                        chunks=(1, V, stored_c),
                        shards=(images_per_shard, V, stored_c),
                        dtype="float32",
                        fill_value=0,
                    )
                taps_attr[name] = {
                    "channels": int(stored_c),
                    "model_channels": int(c),
                    "height": int(h),
                    "width": int(w),
                    "stride": int(tap_strides[name]),
                }
            # One chunk file per shard: marking a shard done never rewrites another's flag.
            root.create_array(
                "done", shape=(n_shards,), chunks=(1,), dtype="bool", fill_value=False
            )
            root.attrs.update(
                {
                    "identity": identity.to_attrs(),
                    "n_images": int(n_images),
                    "images_per_shard": int(images_per_shard),
                    "taps": taps_attr,
                }
            )
        return cls.open(path, identity, mode="r+")

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        expected_identity: StoreIdentity | None = None,
        mode: str = "r",
    ) -> FeatureStore:
        """Open an existing store; raise StoreError naming the differing identity fields."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: no feature store here (missing zarr.json)")
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
        except Exception as e:  # zarr raises several types for unreadable metadata
            raise StoreError(f"{path}: cannot open as a Zarr v3 group: {e}") from e
        store = cls(path, group, read_only=mode == "r")
        if expected_identity is not None and store.identity != expected_identity:
            diffs = "; ".join(store.identity.differences(expected_identity))
            raise StoreError(
                f"{path}: store identity differs from the requested one ({diffs}); "
                "remove the store to recompute it"
            )
        return store

    # ---- layout ------------------------------------------------------------------------
    @property
    def taps(self) -> list[str]:
        """Tap names, in model order."""
        return list(self.identity.taps)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Image range [start, stop) of a shard."""
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"{self.path}: shard {shard} out of range 0..{self.n_shards - 1}")
        start = shard * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)

    def stored_shape(self, tap: str) -> tuple[int, int, int]:
        """(C, h, w) as stored (C = k under PCA)."""
        i = self.tap_info[tap]
        return i["channels"], i["height"], i["width"]

    def done_mask(self) -> np.ndarray:
        """Bool per shard: True once all of its data is written."""
        return np.asarray(self.group["done"][:], dtype=bool)

    def missing_shards(self) -> list[int]:
        """Shards not yet marked done, ascending."""
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        """True when every shard is done."""
        return bool(self.done_mask().all())

    def projection(self, tap: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(components (k, C), mean (C,)) of a PCA store, else None."""
        if self.storage.kind != "pca":
            return None
        return (
            np.asarray(self.group[f"pca/{tap}/components"][:]),
            np.asarray(self.group[f"pca/{tap}/mean"][:]),
        )

    # ---- writing -----------------------------------------------------------------------
    def write_shard(
        self,
        shard: int,
        features: Mapping[str, np.ndarray],
        scales: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write one whole shard of every tap, then mark it done (zarr-python #3682: no partials)."""
        start, stop = self.shard_range(shard)
        n, V = stop - start, self.identity.n_variants
        if set(features) != set(self.taps):
            raise StoreError(
                f"{self.path}: shard {shard} has taps {sorted(features)}, expected {self.taps}"
            )
        for tap in self.taps:
            x = np.asarray(features[tap])
            want = (n, V, *self.stored_shape(tap))
            if x.shape != want:
                raise StoreError(
                    f"{self.path}: shard {shard} tap {tap} has shape {x.shape}, expected {want}"
                )
        if self.storage.kind == "int8":
            if scales is None or set(scales) != set(self.taps):
                raise StoreError(f"{self.path}: int8 storage needs scales for every tap")
            for tap in self.taps:
                shape = np.shape(scales[tap])
                if shape != (n, V, self.stored_shape(tap)[0]):
                    raise StoreError(f"{self.path}: scales of {tap} have shape {shape}")
        for tap in self.taps:
            x = np.asarray(features[tap]).astype(self.storage.dtype, copy=False)
            self._write(f"features/{tap}", shard, start, stop, x)
            if self.storage.kind == "int8":
                s = np.asarray(scales[tap], dtype=np.float32)  # type: ignore[index]
                self._write(f"scales/{tap}", shard, start, stop, s)
        # Only after every tap's data: a shard marked done is complete (resume relies on it).
        self.group["done"][shard] = True

    def _write(self, name: str, shard: int, start: int, stop: int, values: np.ndarray) -> None:
        files = self._array_files(name)
        if files is not None:
            files.write_shard((shard,) + (0,) * (values.ndim - 1), values)
        else:
            with zarr.config.set(_WRITE_CONFIG):
                self._array(name)[start:stop] = values

    def remove_partial_files(self) -> int:
        """Delete temp files a killed writer left behind (zarr writes via *.partial + rename)."""
        n = 0
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    # ---- reading -----------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]  # each lookup re-reads zarr.json otherwise
        return self._arrays[name]

    def _array_files(self, name: str) -> ShardedArrayFiles | None:
        if name not in self._files:
            try:
                self._files[name] = ShardedArrayFiles(self._array(name), self.path / name)
            except ValueError:
                self._files[name] = None  # another layout: through zarr
        return self._files[name]

    def _chunk_reader(self, name: str) -> ShardedArrayFiles | None:
        # Writable stores read through zarr: direct readers cache shard indexes.
        return self._array_files(name) if self.read_only else None

    def read(
        self,
        tap: str,
        index: int,
        variant: int = 0,
        window: tuple[slice, slice] | None = None,
    ) -> np.ndarray:
        """(C, h, w) of one image (optionally a window in feature pixels): float16 as stored,
        or float32 de-quantised from int8. Consumers cast on their device, where it is free."""
        ys, xs = window if window is not None else (slice(None), slice(None))
        # A chunk is one whole image-variant, so a window decodes the same bytes either way.
        name = f"features/{tap}"
        fast = self._chunk_reader(name)
        if fast is not None:
            x = fast.read((index, variant, 0, 0, 0))[0, 0, :, ys, xs]
        else:
            x = self._array(name)[index, variant, :, ys, xs]
        if self.storage.kind == "int8":
            name = f"scales/{tap}"
            fast = self._chunk_reader(name)
            s = fast.read((index, 0, 0))[0, variant] if fast else self._array(name)[index, variant]
            return dequantize_int8(x, s)
        return np.asarray(x)
