"""The feature store: one Zarr v3 group per timestep and domain, one group per tap.

Its rules (identity, whole-shard writes, checksums, resume) are in docs/store.md; its
layout, (image, variant) -> (shard, slot), is `slot` below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from pipeline.cache.shards import KEY_ENCODING, ShardedArrayFiles, checksum
from pipeline.cache.storage import Part, StorageMode, chunk_codecs, parse_storage
from pipeline.core.errors import ConfigError, IdentityError, OutputError, StoreError
from pipeline.core.fileio import OWNER, atomic_path, written_here
from pipeline.core.params import validate

FORMAT_VERSION = 4  # 4: the taps of one shape share an array; byte-sized shards; flat keys
# Named axes of each array (zarr v3 dimension_names): xarray and other readers see them.
VALUES_DIMS = ("image", "variant", "tap", "channel", "y", "x")


def slot(image: int, variant: int, images_per_shard: int, n_variants: int) -> tuple[int, int]:
    """The store's layout: (image, variant) is chunk `slot` of shard file `shard`, returned as
    (shard, slot). A values chunk is one image-variant (every tap of its group); a shard holds
    `images_per_shard` whole images, its chunks in (image, variant) order. A scales chunk is one
    image's variants: its slot is `slot // n_variants`."""
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


@dataclasses.dataclass(frozen=True)
class TapGroup:
    """Taps of one shape (stride, channels): one array holds them all, so a sample's taps are
    read with one call per group, not per tap, and a shard is a file per group, not per tap."""

    name: str
    taps: tuple[str, ...]
    stride: int
    model_channels: int
    channels: int  # as stored (k under PCA)
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(tap, channel, y, x) of one image-variant: a values chunk."""
        return len(self.taps), self.channels, self.height, self.width


def tap_groups(
    tap_shapes: Mapping[str, tuple[int, int, int]],
    tap_strides: Mapping[str, int],
    storage: StorageMode,
) -> tuple[TapGroup, ...]:
    """The taps grouped by (stride, model channels), in model order of each group's first tap."""
    members: dict[tuple[int, int, int, int], list[str]] = {}
    for tap, (c, h, w) in tap_shapes.items():
        members.setdefault((tap_strides[tap], c, h, w), []).append(tap)
    groups = tuple(
        TapGroup(f"s{s}c{c}", tuple(taps), s, c, storage.stored_channels(c), h, w)
        for (s, c, h, w), taps in members.items()
    )
    if len({g.name for g in groups}) != len(groups):
        raise StoreError(f"taps of one stride and width differ in size: {tap_shapes}")
    return groups


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of a store: its path, shape, chunking (shards None: unsharded) and type."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dtype: np.dtype
    dims: tuple[str, ...]

    def chunk_keys(self) -> list[str]:
        """The files holding data (shard files, or chunks of an unsharded array), all full."""
        per_file = self.shards or self.chunks
        counts = [-(-n // c) for n, c in zip(self.shape, per_file, strict=True)]
        return [".".join(("c", *map(str, i))) for i in np.ndindex(*counts)]

    def data_bytes(self) -> int:
        """Bytes of its data files: chunks with their crc32c, shard indexes with theirs."""
        per_chunk = int(np.prod(self.chunks)) * self.dtype.itemsize + CRC
        chunks = int(np.prod([-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True)]))
        if self.shards is None:
            return chunks * per_chunk
        slots = int(np.prod([s // c for s, c in zip(self.shards, self.chunks, strict=True)]))
        return chunks * per_chunk + len(self.chunk_keys()) * (slots * SHARD_INDEX_SLOT + CRC)


# Bytes a shard file's index takes per chunk slot (offset, length: two uint64) and its crc32c.
SHARD_INDEX_SLOT, CRC = 16, 4
METADATA_BYTES = 1000  # a zarr.json, about (measured: 0.9-1.1 KB on average, tests/test_plan.py)


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Every array of a store and its files: what FeatureStore.create lays out, extract fills,
    the plan budgets (bytes, files) and DVC pays for file by file."""

    n_images: int
    variants: int
    storage: StorageMode
    groups: tuple[TapGroup, ...]
    images_per_shard: int

    @classmethod
    def of(
        cls,
        n_images: int,
        variants: int,
        tap_shapes: Mapping[str, tuple[int, int, int]],
        tap_strides: Mapping[str, int],
        storage: str,
        images_per_shard: int,
    ) -> StoreLayout:
        mode = parse_storage(storage)
        groups = tap_groups(tap_shapes, tap_strides, mode)
        return cls(n_images, variants, mode, groups, min(images_per_shard, n_images))

    @classmethod
    def sized(
        cls,
        n_images: int,
        variants: int,
        tap_shapes: Mapping[str, tuple[int, int, int]],
        tap_strides: Mapping[str, int],
        storage: str,
        shard_mb: float,
        batch_size: int,
    ) -> StoreLayout:
        """The layout with shards of about `shard_mb` MB (`shard_images`)."""
        one = cls.of(n_images, variants, tap_shapes, tap_strides, storage, 1)
        ips = shard_images(shard_mb, one.image_bytes(), batch_size)
        return dataclasses.replace(one, images_per_shard=min(ips, n_images))

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.images_per_shard)

    def arrays(self) -> list[ArraySpec]:
        """Every array: per group `values` and what the storage mode adds (per image-variant:
        int8's scales; once: PCA's components and mean), and `done`, each shard's checksum once
        written (one chunk per shard: marking one done never rewrites another's)."""
        n, V, ips, mode = self.n_images, self.variants, self.images_per_shard, self.storage
        out = []
        for g in self.groups:
            where, T = f"features/{g.name}", len(g.taps)
            lay = grid(ips, V, g.shape)
            out.append(
                ArraySpec(
                    f"{where}/values", (n, V, *g.shape), **lay, dtype=mode.dtype, dims=VALUES_DIMS
                )
            )
            for name, part in mode.parts(g.channels).items():
                shape = (T, *part.shape)
                lay = grid(ips, V, shape, chunk_variants=V if part.all_variants else 1)
                dims = ("image", "variant", "tap", *part.dims)
                out.append(
                    ArraySpec(f"{where}/{name}", (n, V, *shape), **lay, dtype=part.dtype, dims=dims)
                )
            for name, part in mode.fixed(T, g.model_channels).items():
                out.append(
                    ArraySpec(
                        f"{where}/{name}", part.shape, part.shape, None, part.dtype, part.dims
                    )
                )
        out.append(ArraySpec("done", (self.n_shards,), (1,), None, np.dtype("uint32"), ("shard",)))
        return out

    def sharded(self) -> list[ArraySpec]:
        """The arrays written shard by shard (values, scales)."""
        return [a for a in self.arrays() if a.shards is not None]

    def image_bytes(self) -> int:
        """Bytes of one image's every variant in every sharded array (what a shard holds per
        image, before compression)."""
        return sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self.sharded())

    def files(self) -> list[str]:
        """Every file, relative to the store's folder (metadata and data)."""
        groups = ["zarr.json", "features/zarr.json"] + [
            f"features/{g.name}/zarr.json" for g in self.groups
        ]
        return groups + [
            f
            for a in self.arrays()
            for f in (f"{a.path}/zarr.json", *(f"{a.path}/{k}" for k in a.chunk_keys()))
        ]

    def bytes(self) -> int:
        """Bytes on disk, uncompressed: data with checksums and indexes, and the metadata."""
        metadata = 2 + len(self.groups) + len(self.arrays())
        return sum(a.data_bytes() for a in self.arrays()) + METADATA_BYTES * metadata


def shard_images(shard_mb: float, image_bytes: int, batch_size: int) -> int:
    """Images per shard for shards of about `shard_mb` MB, a multiple of the extraction batch
    where at least one batch fits: batches never span shards, so every shard size gives the
    same batches and so the same features."""
    n = max(1, int(shard_mb * 1e6 // image_bytes))
    return n - n % batch_size if n >= batch_size else n


def _create_tap_group(
    root: zarr.Group,
    group: TapGroup,
    layout: StoreLayout,
    identity: StoreIdentity,
    projections: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
    codecs: tuple[list, list],
    where: str,
) -> None:
    """One group's arrays (values; int8 scales; PCA components and mean) and attributes."""
    chunk_codecs_, small = codecs
    node = root.create_group(f"features/{group.name}")
    data = layout.storage.fixed_data([(projections or {}).get(t) for t in group.taps])
    for name, part in layout.storage.fixed(len(group.taps), group.model_channels).items():
        if data[name].shape != part.shape:
            raise StoreError(
                f"{where}: {name} of {list(group.taps)} has shape {data[name].shape}, expected "
                f"{part.shape}"
            )
    for a in layout.arrays():
        name = a.path.rpartition("/")[2]
        if not a.path.startswith(f"features/{group.name}/"):
            continue
        node.create_array(
            name,
            shape=a.shape,
            chunks=a.chunks,
            shards=a.shards,
            dtype=a.dtype,
            compressors=chunk_codecs_ if name == "values" else small,
            fill_value=0,
            dimension_names=a.dims,
            chunk_key_encoding=KEY_ENCODING,
        )
        if name in data:
            node[name][...] = data[name]
    # What a reader needs besides the arrays (xarray shows group attributes): tap t of this
    # group is values[:, :, taps.index(t)].
    node.attrs.update(
        {
            "taps": list(group.taps),
            "channels": group.channels,
            "model_channels": group.model_channels,
            "height": group.height,
            "width": group.width,
            "stride": group.stride,
            "storage": identity.storage,
            "timestep": identity.timestep,
            "decode": layout.storage.decode,
        }
    )


def values_name(group: str) -> str:
    """The array of a tap group's stored values, (image, variant, tap, channel, y, x)."""
    return f"features/{group}/values"


def scales_name(group: str) -> str:
    """The per-channel int8 scales of a tap group, (image, variant, tap, channel)."""
    return f"features/{group}/scales"


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
def writer_lock(folder: str | os.PathLike[str], shared: bool = False) -> Iterator[None]:
    """Hold a lock on `folder` (created if absent) while writing stores in it: exclusive for a
    writer that creates or replaces stores, shared among the tasks of one array, which write
    disjoint shards. A writer that cannot have it stops with one clear error; the kernel drops
    the lock if the holder dies."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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


def digest_path(features_dir: str | os.PathLike[str], timestep: int) -> Path:
    """extract@<timestep>'s digest of its stores: <features_dir>/digests/t<timestep>.json, what
    train, evaluate and tune_prompt depend on in dvc.yaml (FeatureStore.content_digest)."""
    return Path(features_dir) / "digests" / f"t{int(timestep)}.json"


def store_path(features_dir: str | os.PathLike[str], timestep: int, domain: str) -> Path:
    """The store of one domain at one timestep: <features_dir>/t<timestep>/<domain>."""
    return timestep_dir(features_dir, timestep) / domain


def store_written_here(path: str | os.PathLike[str]) -> bool:
    """Whether this pipeline wrote the store at `path`: its root or its done mask says so (one
    of the two survives damage to the other)."""
    return written_here(path) or written_here(Path(path) / "done")


class FeatureStore:
    """A feature group on disk: per tap group `features/<group>/values` (N, V, T, C, h, w)
    (with `scales` under int8, `components` and `mean` under PCA), and a per-shard `done` mask."""

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
            self.tap_info: dict[str, dict[str, Any]] = dict(attrs["taps"])
            # tap -> (its group, its place on the group's tap axis)
            self._where = {t: (i["group"], int(i["index"])) for t, i in self.tap_info.items()}
        except (KeyError, TypeError) as e:
            raise StoreError(f"{path}: not a feature store (bad attributes: {e})") from e
        self.storage: StorageMode = parse_storage(self.identity.storage)
        self.n_shards = -(-self.n_images // self.images_per_shard)
        self.groups = list(dict.fromkeys(g for g, _ in self._where.values()))
        self._layout: StoreLayout | None = None

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
        layout = StoreLayout.of(
            n_images,
            identity.n_variants,
            tap_shapes,
            tap_strides,
            identity.storage,
            images_per_shard,
        )
        if layout.storage.fixed(1, 1):  # what it holds once comes from projections
            missing = sorted(set(tap_shapes) - set(projections or {}))
            if missing:
                raise StoreError(
                    f"{path}: storage {layout.storage.name} needs projections for taps {missing}"
                )
        codecs = (chunk_codecs(identity.compression, checksum), chunk_codecs("none", checksum))
        taps_attr = {
            tap: {
                "group": g.name,
                "index": i,
                "channels": g.channels,
                "model_channels": g.model_channels,
                "height": g.height,
                "width": g.width,
                "stride": g.stride,
            }
            for g in layout.groups
            for i, tap in enumerate(g.taps)
        }
        with atomic_path(path) as tmp:
            root = zarr.open_group(tmp, mode="w-", zarr_format=3)
            for g in layout.groups:
                _create_tap_group(
                    root, g, layout, identity, projections, codecs, f"{path}: {g.name}"
                )
            root.create_array(
                "done",
                shape=(layout.n_shards,),
                chunks=(1,),
                dtype="uint32",
                fill_value=0,
                compressors=codecs[1],
                dimension_names=("shard",),
                chunk_key_encoding=KEY_ENCODING,
                # Which pipeline wrote the store (fileio.written_here), kept twice: a store whose
                # root metadata is damaged is still known as this pipeline's to recreate.
                attributes={"written_by": OWNER},
            )
            root.attrs.update(
                {
                    "written_by": OWNER,
                    "identity": identity.to_attrs(),
                    "n_images": int(n_images),
                    "images_per_shard": layout.images_per_shard,
                    "taps": {t: taps_attr[t] for t in tap_shapes},
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

    def group_taps(self, group: str) -> list[str]:
        """The taps of one group, in the order of its tap axis."""
        return sorted((t for t, (g, _) in self._where.items() if g == group), key=self._index)

    def _index(self, tap: str) -> int:
        return self._where[tap][1]

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
        return self.layout().image_bytes() * self.images_per_shard

    def done_mask(self) -> np.ndarray:
        """Bool per shard: True once all of its data is written."""
        return self.shard_checksums() != 0

    def shard_checksums(self) -> np.ndarray:
        """Per shard the checksum of its files' bytes (shards.checksum) once written, else 0."""
        if self._done is not None:
            return self._done
        try:
            done = np.asarray(self.group["done"][:], dtype=np.uint32)
        except Exception as e:  # a damaged flag chunk: zarr's checksum or decode error
            raise StoreError(f"{self.path}/done: unreadable done mask ({e})") from None
        if self.read_only:
            self._done = done
        return done

    def content_digest(self) -> dict[str, Any]:
        """What the store holds, in a few bytes: its identity, layout and one sha256 over its
        shards' checksums (equal for equal stores). Downstream stages depend on it instead of
        on the store's files, which DVC would walk at every status (docs/scale.md)."""
        checksums = self.shard_checksums()
        if not checksums.all():
            raise StoreError(f"{self.path}: incomplete store (shards {self.missing_shards()})")
        content = hashlib.sha256(checksums.astype("<u4").tobytes()).hexdigest()
        return {
            "images": self.n_images,
            "images_per_shard": self.images_per_shard,
            "identity": self.identity.to_attrs(),
            "content": content,
        }

    def missing_shards(self) -> list[int]:
        """Shards not yet marked done, ascending."""
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        """True when every shard is done."""
        return bool(self.done_mask().all())

    def projection(self, tap: str) -> tuple[np.ndarray, ...] | None:
        """A tap's projection (PCA: components (k, C), mean (C,)): what its storage mode holds
        once per tap group; None where it holds nothing so."""
        group, i = self._where[tap]
        fixed = self.storage.fixed(1, 1)
        if not fixed:
            return None
        try:
            return tuple(np.asarray(self.group[f"features/{group}/{name}"][i]) for name in fixed)
        except Exception as e:
            raise StoreError(f"{self.path}/features/{group}: unreadable projection ({e})") from None

    def projections(self) -> dict[str, tuple[np.ndarray, ...]] | None:
        """Every tap's projection, or None where the mode holds none (`projection`)."""
        if not self.storage.fixed(1, 1):
            return None
        return {t: self.projection(t) for t in self.taps}  # type: ignore[misc]

    def layout(self) -> StoreLayout:
        """The layout the store was created with (its arrays and files)."""
        if self._layout is None:
            info = self.tap_info
            self._layout = StoreLayout.of(
                self.n_images,
                self.identity.n_variants,
                {t: (i["model_channels"], i["height"], i["width"]) for t, i in info.items()},
                {t: i["stride"] for t, i in info.items()},
                self.identity.storage,
                self.images_per_shard,
            )
        return self._layout

    def _parts(self, group: str) -> dict[str, Part]:
        """The arrays beside `values` a tap group holds per image-variant (its mode's)."""
        return self.storage.parts(self.stored_shape(self.group_taps(group)[0])[0])

    def foreign_files(self) -> list[tuple[Path, str]]:
        """(path, what it is) of everything in the store's folder its layout does not hold: a
        symbolic link, a killed writer's partial file, a file put there by something else."""
        known = set(self.layout().files())
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_symlink():
                out.append((p, f"a symbolic link (to {os.readlink(p)}): a store holds files only"))
            elif p.is_file() and p.name.endswith(".partial"):
                out.append((p, "a killed writer's partial file (extract removes it)"))
            elif p.is_file() and rel not in known:
                out.append((p, "not a file of this store (put there by something else)"))
        return out

    def array_names(self) -> list[str]:
        """The sharded arrays of every group: values, and its mode's parts (int8's scales)."""
        return [a.path for a in self.layout().sharded()]

    # ---- writing -----------------------------------------------------------------------
    def write_shard(
        self,
        shard: int,
        features: Mapping[str, np.ndarray],
        **parts: Mapping[str, np.ndarray] | None,
    ) -> None:
        """Write one whole shard of every tap: `features` the values (n, V, C, h, w) per tap,
        and the parts its mode stores beside them (int8's `scales`, (n, V, C) per tap); then
        mark it done (zarr-python #3682: no partials)."""
        start, stop = self.shard_range(shard)
        n, V = stop - start, self.identity.n_variants
        given = {"values": features, **{k: v for k, v in parts.items() if v is not None}}
        for group in self.groups:
            wanted = {
                "values": Part(self.stored_shape(self.group_taps(group)[0]), self.storage.dtype, ())
            }
            wanted |= self._parts(group)
            if set(given) != set(wanted):
                raise StoreError(
                    f"{self.path}: storage {self.storage.name} stores {sorted(wanted)} per tap, "
                    f"not {sorted(given)}"
                )
            for name, part in wanted.items():
                if set(given[name]) != set(self.taps):
                    raise StoreError(
                        f"{self.path}: shard {shard} has taps {sorted(given[name])} of {name}, "
                        f"expected {self.taps}"
                    )
                for tap in self.group_taps(group):
                    shape = np.shape(given[name][tap])
                    if shape != (n, V, *part.shape):
                        raise StoreError(
                            f"{self.path}: shard {shard} tap {tap} {name} has shape {shape}, "
                            f"expected {(n, V, *part.shape)}"
                        )
        crcs = []
        for group in self.groups:
            taps = self.group_taps(group)
            dtypes = {"values": self.storage.dtype} | {
                k: p.dtype for k, p in self._parts(group).items()
            }
            for name, dtype in dtypes.items():
                x = np.stack([np.asarray(given[name][t], dtype=dtype) for t in taps], 2)
                crcs.append(self._write(f"features/{group}/{name}", shard, x))
        # Only after every group's data: a shard marked done is complete (resume relies on it).
        self.set_done(shard, checksum([np.asarray(crcs, "<u4").tobytes()]))

    def set_done(self, shard: int, checksum: int) -> None:
        """Mark one shard written with its files' checksum (0: not written; extract then
        recomputes it)."""
        self.group["done"][shard] = checksum

    def _write(self, name: str, shard: int, values: np.ndarray) -> int:
        return self.array_files(name).write_shard((shard,) + (0,) * (values.ndim - 1), values)

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
        writer recomputes them: a resumed store is never reported complete with a bad shard.
        Only in a store this pipeline wrote (its mark: `store_written_here`)."""
        if not store_written_here(self.path):
            raise OutputError(f"{self.path}: not written by this pipeline; its files are kept")
        redo = sorted(
            {shard for shard, file, _ in self.verify() if file.unlink(missing_ok=True) is None}
        )
        for shard in redo:
            self.set_done(shard, 0)
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
            self.set_done(int(s), 0)
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

    def tap_file(self, tap: str) -> ShardedArrayFiles:
        """The sharded values array holding `tap` (its group's)."""
        return self.array_files(values_name(self._where[tap][0]))

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
    ) -> list[np.ndarray | tuple[np.ndarray, ...]]:
        """`read(tap, index, variant, decode=False)` of each of `taps`, one chunk read per tap
        group: the values, or (values, *parts) where the mode stores parts (int8's scales)."""
        values = [np.empty(self.stored_shape(t), self.storage.dtype) for t in taps]
        per_tap = [self.storage.parts(self.stored_shape(t)[0]) for t in taps]
        parts = {
            name: [np.empty(p[name].shape, p[name].dtype) for p in per_tap] for name in per_tap[0]
        }
        self.read_into(taps, index, variant, values, **parts)
        return values if not parts else list(zip(values, *parts.values(), strict=True))

    def read_into(
        self,
        taps: Sequence[str],
        index: int,
        variant: int,
        values: Sequence[np.ndarray],
        **parts: Sequence[np.ndarray],
    ) -> None:
        """The values of `taps` for one row under one variant read into `values` (a C-contiguous
        (C, h, w) array of the store's dtype per tap, wherever the caller keeps it) and the
        mode's parts into `parts` (int8: `scales=`, a (C,) float32 array per tap): one read per
        tap group and array, the chunk scattered straight into place."""
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
        wanted = dict(zip(taps, range(len(taps)), strict=True))
        for group in dict.fromkeys(self._where[t][0] for t in taps):
            members = self.group_taps(group)
            into = [
                values[wanted[t]]
                if t in wanted
                else np.empty(self.stored_shape(t), self.storage.dtype)
                for t in members
            ]
            name = values_name(group)
            files = self._files.get(name) or self.array_files(name)
            files.read_local_into((shard, 0, 0, 0, 0, 0), local, into, ahead, written)
            for part_name, part in self._parts(group).items():
                if part_name not in parts:
                    continue
                name = f"features/{group}/{part_name}"
                pfiles = self._files.get(name) or self.array_files(name)
                at = (local // n_variants, variant) if part.all_variants else (local, 0)
                coords = (shard,) + (0,) * (len(part.shape) + 2)
                chunk = pfiles.read_local(coords, at[0], False, written)
                for i, t in enumerate(members):
                    if t in wanted:
                        parts[part_name][wanted[t]][:] = chunk[0, at[1], i]

    def read(
        self,
        tap: str,
        index: int,
        variant: int = 0,
        window: tuple[slice, slice] | None = None,
        decode: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """(C, h, w) of one image (optionally a window in feature pixels), decoded by its mode
        (fp16 as stored, int8 de-quantised to float32); `decode` False: as stored, the values
        and the mode's parts (int8's (C,) scales), for the device to decode."""
        ys, xs = window if window is not None else (slice(None), slice(None))
        group, i = self._where[tap]
        # A chunk is one whole image-variant, so a window decodes the same bytes either way.
        x = self._chunk(values_name(group), (index, variant, 0, 0, 0, 0))[0, 0, i, :, ys, xs]
        parts = {}
        for name, part in self._parts(group).items():
            coords = (index, 0 if part.all_variants else variant) + (0,) * (len(part.shape) + 1)
            chunk = self._chunk(f"features/{group}/{name}", coords)
            parts[name] = np.asarray(chunk[0, variant if part.all_variants else 0, i])
        if decode:
            return self.storage.decode_parts(np.asarray(x), parts) if parts else np.asarray(x)
        return (np.asarray(x), *parts.values()) if parts else np.asarray(x)
