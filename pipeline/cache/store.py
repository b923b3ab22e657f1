"""The feature store: one Zarr v3 group per timestep and domain, one group per tap.

Its rules (identity, whole-shard writes, checksums, resume) are in docs/store.md; its
layout, (image, variant) -> (shard, slot), is `slot` below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from pipeline.cache.shards import ShardedArrayFiles
from pipeline.cache.storage import StorageMode, chunk_codecs, dequantize_int8, parse_storage
from pipeline.core.errors import ConfigError, IdentityError, StoreError
from pipeline.core.fileio import OWNER, atomic_path, written_here
from pipeline.core.params import validate

FORMAT_VERSION = 3  # 3: a group per tap with named axes, crc32c on every chunk
# Named axes of each array (zarr v3 dimension_names): xarray and other readers see them.
VALUES_DIMS = ("image", "variant", "channel", "y", "x")
SCALES_DIMS = ("image", "variant", "channel")


def slot(image: int, variant: int, images_per_shard: int, n_variants: int) -> tuple[int, int]:
    """The store's layout: (image, variant) is chunk `slot` of shard file `shard`, returned as
    (shard, slot). A values chunk is one image-variant; a shard holds `images_per_shard` whole
    images, its chunks in (image, variant) order. A scales chunk is one image's variants: its
    slot is `slot // n_variants`."""
    shard, row = divmod(image, images_per_shard)
    return shard, row * n_variants + variant


def grid(
    images_per_shard: int, n_variants: int, shape: tuple[int, ...], chunk_variants: int = 1
) -> dict[str, tuple]:
    """The chunk and shard shapes of a (image, variant, *shape) array that make `slot` true: a
    chunk holds `chunk_variants` of one image's variants (values 1, scales all of them)."""
    return {
        "chunks": (1, chunk_variants, *shape),
        "shards": (images_per_shard, n_variants, *shape),
    }


def _create_tap(
    group: zarr.Group,
    where: str,
    identity: StoreIdentity,
    rows: tuple[int, int, int],
    shape: tuple[int, int, int],
    stride: int,
    projection: tuple[np.ndarray, np.ndarray] | None,
    codecs: tuple[list, list],
) -> dict[str, int]:
    """One tap's arrays (values; int8 scales; PCA components and mean) and attributes in its
    group; `rows` is (n_images, variants, images_per_shard); returns its `taps` entry."""
    (n_images, V, images_per_shard), (c, h, w) = rows, shape
    mode, (chunk_codecs_, small) = parse_storage(identity.storage), codecs
    stored_c = c
    if mode.kind == "pca":
        comp, mean = (np.asarray(a, dtype=np.float32) for a in projection)  # type: ignore[union-attr]
        if comp.ndim != 2 or comp.shape[1] != c or mean.shape != (c,):
            raise StoreError(
                f"{where}: projection has shape {comp.shape}/{mean.shape}, expected (k, {c})/({c},)"
            )
        stored_c = comp.shape[0]
        group.create_array(
            "components", data=comp, compressors=small, dimension_names=("channel", "model_channel")
        )
        group.create_array("mean", data=mean, compressors=small, dimension_names=("model_channel",))
    group.create_array(
        "values",
        shape=(n_images, V, stored_c, h, w),
        **grid(images_per_shard, V, (stored_c, h, w)),
        dtype=mode.dtype,
        compressors=chunk_codecs_,
        fill_value=0,
        dimension_names=VALUES_DIMS,
    )
    if mode.quantized:
        group.create_array(
            "scales",
            shape=(n_images, V, stored_c),
            **grid(images_per_shard, V, (stored_c,), chunk_variants=V),
            dtype="float32",
            compressors=small,
            fill_value=0,
            dimension_names=SCALES_DIMS,
        )
    attrs = {
        "channels": int(stored_c),
        "model_channels": int(c),
        "height": int(h),
        "width": int(w),
        "stride": int(stride),
    }
    # What a reader needs besides the arrays (xarray shows group attributes).
    group.attrs.update(
        {**attrs, "storage": identity.storage, "timestep": identity.timestep, "decode": mode.decode}
    )
    return attrs


def values_name(tap: str) -> str:
    """The array of a tap's stored values, (image, variant, channel, y, x)."""
    return f"features/{tap}/values"


def scales_name(tap: str) -> str:
    """The per-channel int8 scales of a tap, (image, variant, channel)."""
    return f"features/{tap}/scales"


@dataclasses.dataclass(frozen=True)
class StoreIdentity:
    """Everything the stored values depend on; a store with another identity is never reused."""

    model_fingerprint: str
    taps: tuple[str, ...]  # tap names, in model order
    tap_modules: tuple[str, ...]  # module path of each tap
    timestep: int
    noise_seed: int
    noise_mode: str  # add | trajectory | clean
    trajectory: str  # fingerprint of the inversion the latents come from ("" under add)
    conditioning: str  # single | diff
    encoding: str  # how the latents were encoded (draws, posterior, photometric, seed)
    images: str  # index_fingerprint of the images, in store order
    resolution: tuple[int, int]  # (H, W) fed to the VAE: the domain's canvas
    prompts: tuple[str, ...]  # prompt variant texts, in store order
    draws: int
    storage: str
    compute_dtype: str
    compression: str  # none | lz4 | zstd (storage.chunk_codecs)
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


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if absent) while writing stores in it: a
    second writer stops with one clear error. The kernel drops the lock if the holder dies."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{folder}: another process is writing these feature stores; wait for it to "
                "finish (or stop it), then rerun"
            ) from None
        yield
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # only while still empty: nothing begun
                folder.rmdir()


def timestep_dir(features_dir: str | os.PathLike[str], timestep: int) -> Path:
    """The output of extract@<timestep>: <features_dir>/t<timestep> (dvc.yaml's outs)."""
    return Path(features_dir) / f"t{int(timestep)}"


def store_path(features_dir: str | os.PathLike[str], timestep: int, domain: str) -> Path:
    """The store of one domain at one timestep: <features_dir>/t<timestep>/<domain>."""
    return timestep_dir(features_dir, timestep) / domain


# Bytes a shard file's index takes per chunk slot (offset, length: two uint64) and its crc32c.
SHARD_INDEX_SLOT, CRC = 16, 4
METADATA_BYTES = 800  # a zarr.json, about (measured: 0.7-0.9 KB on average)


def store_bytes(
    n_images: int,
    variants: int,
    tap_shapes: Mapping[str, tuple[int, int, int]],
    storage: str,
    images_per_shard: int,
) -> int:
    """Bytes on disk of a store FeatureStore.create lays out (uncompressed chunks): values
    (and int8 scales, PCA projections) with their checksums and shard indexes, the done mask
    and the metadata. `tap_shapes` are the model's (channels, h, w) per tap."""
    mode = parse_storage(storage)
    n_shards = -(-n_images // images_per_shard)
    index = n_shards * (images_per_shard * variants * SHARD_INDEX_SLOT + CRC)
    arrays = 2 + mode.quantized + 2 * (mode.kind == "pca")  # and a group, per tap
    total = n_shards * (1 + CRC) + METADATA_BYTES * (3 + arrays * len(tap_shapes))
    for c, h, w in tap_shapes.values():
        stored = mode.k if mode.kind == "pca" else c
        total += n_images * variants * (stored * h * w * mode.dtype.itemsize + CRC) + index
        if mode.quantized:
            total += n_images * (variants * stored * 4 + CRC)
            total += n_shards * (images_per_shard * SHARD_INDEX_SLOT + CRC)
        if mode.kind == "pca":
            total += (stored * c + c) * 4 + 2 * CRC
    return total


def store_files(
    n_images: int,
    variants: int,
    tap_shapes: Mapping[str, tuple[int, int, int]],
    storage: str,
    images_per_shard: int,
) -> list[str]:
    """The files of a store FeatureStore.create lays out and extract fills, relative to the
    store's folder: what DVC stats, hashes, links and pushes one by one."""
    mode = parse_storage(storage)
    n_shards = -(-n_images // images_per_shard)
    shards = range(n_shards)
    files = ["zarr.json", "features/zarr.json", "done/zarr.json"]
    files += [f"done/c/{s}" for s in shards]
    for tap in tap_shapes:
        files += [f"features/{tap}/zarr.json", f"{values_name(tap)}/zarr.json"]
        files += [f"{values_name(tap)}/c/{s}/0/0/0/0" for s in shards]
        if mode.quantized:
            files.append(f"{scales_name(tap)}/zarr.json")
            files += [f"{scales_name(tap)}/c/{s}/0/0" for s in shards]
        if mode.kind == "pca":
            files += [f"features/{tap}/components/zarr.json", f"features/{tap}/components/c/0/0"]
            files += [f"features/{tap}/mean/zarr.json", f"features/{tap}/mean/c/0"]
    return files


def store_written_here(path: str | os.PathLike[str]) -> bool:
    """Whether this pipeline wrote the store at `path`: its root or its done mask says so (one
    of the two survives damage to the other)."""
    return written_here(path) or written_here(Path(path) / "done")


class FeatureStore:
    """A feature group on disk: per tap `features/<tap>/values` (N, V, C, h, w) (with `scales`
    under int8, `components` and `mean` under PCA), and a per-shard `done` mask."""

    def __init__(self, path: Path, group: zarr.Group, read_only: bool = False) -> None:
        self.path = path
        self.group = group
        # Read-only stores assume nothing changes under them: shard indexes and the done mask
        # are read once.
        self.read_only = read_only
        self._arrays: dict[str, zarr.Array] = {}
        self._files: dict[str, ShardedArrayFiles] = {}
        self._done: np.ndarray | None = None
        self._done_list: list[bool] | None = None  # the mask as Python bools (per-chunk reads)
        self._next_row: tuple[int, int] | None = None  # the (image, variant) read_row expects
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
        checksum: bool = True,
    ) -> FeatureStore:
        """Create the store at full size, atomically (it exists fully created or not at all).

        tap_shapes are the model's (C, h, w); with PCA storage `projections` gives per tap
        (components (k, C), mean (C,)) and the arrays hold k channels. `checksum=False` only
        measures what the per-chunk crc32c costs (benchmarks/store_io.py).
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
        codecs = chunk_codecs(identity.compression, checksum)
        small = chunk_codecs("none", checksum)
        n_shards = -(-n_images // images_per_shard)
        V = identity.n_variants
        taps_attr: dict[str, dict[str, int]] = {}
        with atomic_path(path) as tmp:
            root = zarr.open_group(tmp, mode="w-", zarr_format=3)
            for name, shape in tap_shapes.items():
                taps_attr[name] = _create_tap(
                    root.create_group(f"features/{name}"),
                    f"{path}: {name}",
                    identity,
                    (n_images, V, images_per_shard),
                    shape,
                    tap_strides[name],
                    (projections or {}).get(name),
                    (codecs, small),
                )
            # One chunk file per shard: marking a shard done never rewrites another's flag.
            root.create_array(
                "done",
                shape=(n_shards,),
                chunks=(1,),
                dtype="bool",
                fill_value=False,
                compressors=small,
                dimension_names=("shard",),
                # Which pipeline wrote the store (fileio.written_here), kept twice: a store whose
                # root metadata is damaged is still known as this pipeline's to recreate.
                attributes={"written_by": OWNER},
            )
            root.attrs.update(
                {
                    "written_by": OWNER,
                    "identity": identity.to_attrs(),
                    "n_images": int(n_images),
                    "images_per_shard": int(images_per_shard),
                    "taps": taps_attr,
                    "variants": "variant v = prompt v // draws, draw v % draws",
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
            raise IdentityError(
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

    def shard_bytes(self) -> int:
        """Bytes of one full shard of every array, before compression (what a write needs)."""
        V, n = self.identity.n_variants, self.images_per_shard
        per_image = sum(int(np.prod(self.stored_shape(t))) for t in self.taps)
        scales = sum(self.stored_shape(t)[0] for t in self.taps) * 4
        return (
            n
            * V
            * (per_image * self.storage.dtype.itemsize + (scales if self.storage.quantized else 0))
        )

    def done_mask(self) -> np.ndarray:
        """Bool per shard: True once all of its data is written."""
        if self._done is not None:
            return self._done
        try:
            done = np.asarray(self.group["done"][:], dtype=bool)
        except Exception as e:  # a damaged flag chunk: zarr's checksum or decode error
            raise StoreError(f"{self.path}/done: unreadable done mask ({e})") from None
        if self.read_only:
            self._done = done
        return done

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
        try:
            return (
                np.asarray(self.group[f"features/{tap}/components"][:]),
                np.asarray(self.group[f"features/{tap}/mean"][:]),
            )
        except Exception as e:
            raise StoreError(f"{self.path}/features/{tap}: unreadable projection ({e})") from None

    def array_names(self) -> list[str]:
        """The sharded arrays of every tap (values, and scales under int8)."""
        return [
            n
            for t in self.taps
            for n in (values_name(t), *([scales_name(t)] if self.storage.quantized else []))
        ]

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
        if self.storage.quantized:
            if scales is None or set(scales) != set(self.taps):
                raise StoreError(f"{self.path}: int8 storage needs scales for every tap")
            for tap in self.taps:
                shape = np.shape(scales[tap])
                if shape != (n, V, self.stored_shape(tap)[0]):
                    raise StoreError(f"{self.path}: scales of {tap} have shape {shape}")
        for tap in self.taps:
            x = np.asarray(features[tap]).astype(self.storage.dtype, copy=False)
            self._write(values_name(tap), shard, x)
            if self.storage.quantized:
                s = np.asarray(scales[tap], dtype=np.float32)  # type: ignore[index]
                self._write(scales_name(tap), shard, s)
        # Only after every tap's data: a shard marked done is complete (resume relies on it).
        self.set_done(shard, True)

    def set_done(self, shard: int, done: bool) -> None:
        """Mark one shard written (or not: extract then recomputes it)."""
        self.group["done"][shard] = done

    def _write(self, name: str, shard: int, values: np.ndarray) -> None:
        self.array_files(name).write_shard((shard,) + (0,) * (values.ndim - 1), values)

    def remove_partial_files(self) -> int:
        """Delete temp files a killed writer left behind (zarr writes via *.partial + rename)."""
        n = 0
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    # ---- checking ----------------------------------------------------------------------
    def shard_files(self, shard: int) -> list[Path]:
        """The files of one shard, one per sharded array."""
        out = []
        for name in self.array_names():
            files = self.array_files(name)
            out.append(files.shard_file((shard,) + (0,) * (len(files.shape) - 1)))
        return out

    def verify(self, progress: bool = False) -> list[tuple[int, Path, str]]:
        """(shard, file, problem) for every bad shard file: a failing checksum or decode, a
        truncated file, or a file missing where the done mask says written."""
        done = self.done_mask()
        bad = []
        for shard in tqdm(
            range(self.n_shards), desc=f"verify {self.path}", unit="shard", disable=not progress
        ):
            for name in self.array_names():
                files = self.array_files(name)
                coords = (shard,) + (0,) * (len(files.shape) - 1)
                path = files.shard_file(coords)
                if not path.exists():
                    if done[shard]:
                        bad.append((shard, path, "missing, but the done mask marks it written"))
                    continue
                problem = files.check_shard(coords)
                if problem is not None:
                    bad.append((shard, path, problem))
        return bad

    def check_metadata(self) -> list[tuple[Path, str]]:
        """(file, problem) of every unreadable metadata file: each array's zarr.json and the
        done mask's chunks (the group's own zarr.json was read by open)."""
        bad = []
        for name in [*self.array_names(), "done"]:
            try:
                self._arrays.pop(name, None)
                self._files.pop(name, None)
                if name == "done":
                    self._done, self._done_list = None, None
                    self.done_mask()
                else:
                    self.array_files(name)
            except StoreError as e:
                file = self.path / name / ("zarr.json" if name != "done" else "")
                message = str(e).removeprefix(f"{file}: ").removeprefix(f"{self.path}: ")
                bad.append((file, message))
        return bad

    def repair(self) -> list[int]:
        """Delete the bad files of done shards (checksums, truncation) and unmark them, so the
        writer recomputes them: a resumed store is never reported complete with a bad shard."""
        redo = sorted(
            {shard for shard, file, _ in self.verify() if file.unlink(missing_ok=True) is None}
        )
        for shard in redo:
            self.set_done(shard, False)
        if self._done is not None and not self.read_only:
            self._done = None
        self._done_list = None
        return redo

    def forget_missing(self) -> list[int]:
        """Un-mark done shards any of whose files is gone (deleted as bad): extract redoes them."""
        gone = [
            s
            for s in np.flatnonzero(self.done_mask())
            if not all(p.exists() for p in self.shard_files(int(s)))
        ]
        for s in gone:
            self.set_done(int(s), False)
        return [int(s) for s in gone]

    # ---- reading -----------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]  # each lookup re-reads zarr.json otherwise
        return self._arrays[name]

    def array_files(self, name: str) -> ShardedArrayFiles:
        """Direct access to one of the store's sharded arrays."""
        if name not in self._files:
            try:
                self._files[name] = ShardedArrayFiles(
                    self._array(name), self.path / name, name, str(self.path), self.read_only
                )
            except KeyError:
                raise StoreError(f"{self.path}: array {name} is missing") from None
            except json.JSONDecodeError as e:
                where = self.path / name / "zarr.json"
                raise StoreError(f"{where}: unreadable array metadata ({e})") from None
            except ValueError as e:  # written by something else than FeatureStore
                raise StoreError(f"{self.path}: array {name}: unexpected layout ({e})") from None
            except Exception as e:  # zarr raises several types for a damaged zarr.json
                where = self.path / name / "zarr.json"
                raise StoreError(f"{where}: unreadable array metadata ({e})") from None
        return self._files[name]

    def _written(self, shard: int) -> bool:
        """Whether the done mask marks `shard` written (read once for read-only stores)."""
        if self._done_list is None or not self.read_only:
            self._done_list = [bool(d) for d in self.done_mask()]
        return self._done_list[shard]

    def _chunk(self, name: str, coords: tuple[int, ...]) -> np.ndarray:
        written = self._written(coords[0] // self.images_per_shard)
        files = self._files.get(name) or self.array_files(name)
        return files.read(coords, required=written)

    def read_row(
        self, taps: Sequence[str], index: int, variant: int = 0
    ) -> list[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """`read(tap, index, variant, decode=False)` of each of `taps`, the chunks' place worked
        out once (the default's rows of 21 small chunks: store_io.py's `loader` against
        `per_chunk_read`): float16 values, or (int8 values, scales) of an int8 store."""
        n_variants = self.identity.n_variants
        if not (0 <= index < self.n_images and 0 <= variant < n_variants):
            raise StoreError(
                f"{self.path}: image {index} variant {variant} out of range "
                f"({self.n_images} images, {n_variants} variants)"
            )
        shard, local = slot(index, variant, self.images_per_shard, n_variants)
        written = self._written(shard)
        ahead = local == 0 and (self._next_row is None or self._next_row == (index, variant))
        self._next_row = (index + 1, variant)
        out: list[np.ndarray | tuple[np.ndarray, np.ndarray]] = []
        for tap in taps:
            name = values_name(tap)
            files = self._files.get(name) or self.array_files(name)
            values = files.read_local((shard, 0, 0, 0, 0), local, ahead, written)[0, 0]
            if not self.storage.quantized:
                out.append(values)
                continue
            scales = self._files.get(scales_name(tap)) or self.array_files(scales_name(tap))
            s = scales.read_local((shard, 0, 0), local // n_variants, False, written)[0, variant]
            out.append((values, s))
        return out

    def read(
        self,
        tap: str,
        index: int,
        variant: int = 0,
        window: tuple[slice, slice] | None = None,
        decode: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """(C, h, w) of one image (optionally a window in feature pixels): float16 as stored,
        or float32 de-quantised from int8 (`decode` False: int8 values and (C,) scales, for the
        device to decode). Consumers cast on their device, where it is free."""
        ys, xs = window if window is not None else (slice(None), slice(None))
        # A chunk is one whole image-variant, so a window decodes the same bytes either way.
        x = self._chunk(values_name(tap), (index, variant, 0, 0, 0))[0, 0, :, ys, xs]
        if self.storage.quantized:
            s = self._chunk(scales_name(tap), (index, 0, 0))[0, variant]
            return dequantize_int8(x, s) if decode else (np.asarray(x), np.asarray(s))
        return np.asarray(x)
