"""The layout of data/encoded (written by encode): the image index, and per encoded set its VAE
latents and labels; the prompt variants' embeddings.

```
data/encoded/index.parquet          every image: domain, split, paths, sha256, original size,
                                    class pixel counts of its original label, the set holding
                                    it and its row there, canvas and content size
data/encoded/<set>/latents.zarr     (N, K, C, h, w): K encode draws per image
data/encoded/<set>/guided_latents.zarr  the same images' own posterior samples for the guided
                                    view (DIFF encodes each view afresh); with a guided variant
data/encoded/<set>/labels.zarr      (N, H, W) uint8 train ids at the canvas (255 = pad), or
                                    (N, K, h, w): the label of each crop draw
data/encoded/<set>/boxes.zarr       crop sets: (N, K, 4) int32 y0, x0, flip, class aimed at (-1)
data/encoded/<set>/draw_pixels.zarr crop sets: (N, K, classes) int64 pixel counts of each draw
data/encoded/prompts.safetensors    (P, 77, D) and the variants' names and texts
```
A set is a domain's whole frames (named as the domain) or, with encode.crop, the source's
training images as crop draws (`<source>-crops`): DIFF crops before the UNet runs, so those
draws are encoded, inverted and extracted at crop size. Domains have their own canvas (GTA
704x1280, Cityscapes 512x1024), hence arrays per set. Every chunk carries a crc32c checksum;
the index and the prompts have a recorded sha256 (`<file>.sha256`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.cache.shards import KEY_ENCODING
from pipeline.core.errors import StoreError
from pipeline.core.fileio import digest_problem, record_digest

INDEX_NAME = "index.parquet"
LATENTS_NAME = "latents.zarr"
GUIDED_LATENTS_NAME = "guided_latents.zarr"
LABELS_NAME = "labels.zarr"
BOXES_NAME = "boxes.zarr"
DRAW_PIXELS_NAME = "draw_pixels.zarr"
PROMPTS_NAME = "prompts.safetensors"
ROWS_PER_SHARD = 64  # latents and labels are small: many images per shard file
GEOMETRY_COLUMNS = ["canvas_h", "canvas_w", "content_h", "content_w"]
CROPS_SUFFIX = "-crops"


def crops_set(domain: str) -> str:
    """The set holding a domain's training images as crop draws."""
    return f"{domain}{CROPS_SUFFIX}"


def index_fingerprint(sha256s: Iterable[str]) -> str:
    """One hash for the ordered list of image content hashes a store is indexed by."""
    h = hashlib.sha256()
    for s in sha256s:
        h.update(str(s).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_index(index: pd.DataFrame, encoded_dir: str | os.PathLike[str]) -> None:
    """index.parquet and its recorded digest (callers write inside an atomic folder)."""
    path = Path(encoded_dir) / INDEX_NAME
    index.to_parquet(path, index=False)
    record_digest(path)


def read_index(encoded_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The global image index written by encode, checked against its recorded digest."""
    path = Path(encoded_dir) / INDEX_NAME
    if not path.is_file():
        raise StoreError(f"{path}: image index not found (run encode)")
    problem = digest_problem(path)
    if problem is not None:
        raise StoreError(f"{path}: {problem}; rerun encode (or `dvc checkout {encoded_dir}`)")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise StoreError(f"{path}: unreadable image index ({e})") from None


def class_pixels(rows: pd.DataFrame) -> np.ndarray:
    """(N, classes) pixel counts of the rows' original labels (rare-class sampling's statistics)."""
    return np.stack([np.asarray(v, dtype=np.int64) for v in rows["class_pixels"]])


def set_index(index: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of one set, in the order of its arrays."""
    rows = index[index["set"] == name]
    if rows.empty:
        raise StoreError(f"no images of set {name!r} in the encoded index")
    return rows.sort_values("row").reset_index(drop=True)


def set_names(index: pd.DataFrame) -> list[str]:
    """Every set: the source's first (they fit the PCA every set shares), then by name."""
    source = source_domain(index)
    sets = sorted(set(index["set"]))
    return sorted(
        sets, key=lambda s: (str(index.loc[index["set"] == s, "domain"].iloc[0]) != source, s)
    )


def split_rows(index: pd.DataFrame, domain: str, split: str) -> tuple[str, list[int]] | None:
    """(the set holding a domain's split, its rows there), or None when the split is empty."""
    rows = index[(index["domain"] == domain) & (index["split"] == split)]
    if rows.empty:
        return None
    sets = sorted(set(rows["set"]))
    if len(sets) != 1:
        raise StoreError(f"the {split} split of domain {domain!r} spans sets {sets}")
    return sets[0], sorted(int(r) for r in rows["row"])


def source_domain(index: pd.DataFrame) -> str:
    """The domain with a train split (prepare gives only the source one)."""
    domains = sorted(set(index.loc[index["split"] == "train", "domain"]))
    if len(domains) != 1:
        raise StoreError(f"the encoded index has train images of domains {domains}, not one source")
    return domains[0]


def target_domains(index: pd.DataFrame) -> list[str]:
    """Every domain but the source, sorted."""
    return sorted(set(index["domain"]) - {source_domain(index)})


def set_dir(encoded_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(encoded_dir) / name


def open_latents(
    encoded_dir: str | os.PathLike[str], name: str, guided: bool = False
) -> zarr.Array:
    """A set's (N, K, C, h, w) latents (the guided view's own samples when `guided` and they
    exist), read-only."""
    path = set_dir(encoded_dir, name) / GUIDED_LATENTS_NAME
    if not (guided and path.exists()):
        path = set_dir(encoded_dir, name) / LATENTS_NAME
    return _open_rows(path, "latents")


def open_labels(encoded_dir: str | os.PathLike[str], name: str) -> zarr.Array:
    """A set's labels, read-only: (N, H, W) for frames, (N, K, h, w) for crop draws."""
    return _open_rows(set_dir(encoded_dir, name) / LABELS_NAME, "labels")


def open_draw_pixels(encoded_dir: str | os.PathLike[str], name: str) -> np.ndarray | None:
    """(N, K, classes) pixel counts of a crop set's draws; None for frames."""
    path = set_dir(encoded_dir, name) / DRAW_PIXELS_NAME
    if not path.exists():
        return None
    return read_whole(_open_rows(path, "draw pixel counts"))


def label_of(labels: zarr.Array | np.ndarray, row: int, draw: int = 0) -> np.ndarray:
    """The (H, W) label of one row's draw (frames: the same for every draw)."""
    sel = row if labels.ndim == 3 else (row, draw)
    return read_whole(labels, sel).astype(np.uint8, copy=False)


def encoded_resolution(encoded_dir: str | os.PathLike[str], name: str) -> list[int]:
    """The (H, W) a set's images were encoded at (its canvas, or the crop)."""
    return [int(v) for v in open_labels(encoded_dir, name).attrs["resolution"]]


def _open_rows(path: Path, what: str) -> zarr.Array:
    if not path.exists():
        raise StoreError(f"{path}: {what} not found (run encode)")
    try:
        return zarr.open_array(path, mode="r")
    except Exception as e:  # zarr raises several types for damaged metadata
        raise StoreError(f"{path}: unreadable {what} metadata ({e}); rerun encode") from None


def read_whole(array: zarr.Array, sel: object = ...) -> np.ndarray:
    """`array[sel]` as numpy; a failing checksum or decode is one StoreError naming the array."""
    try:
        return np.asarray(array[sel])
    except Exception as e:  # zarr's crc32c codec and blosc raise ValueError / RuntimeError
        where = str(array.store_path).removeprefix("file://")
        raise StoreError(f"{where}: corrupt chunk ({e}); rerun the stage that wrote it") from None


def rows_array_files(shape: tuple[int, ...]) -> list[str]:
    """The files of a create_rows_array array (metadata and shard files), relative to it."""
    return ["zarr.json", *(shard_key(shape, i) for i in range(-(-shape[0] // ROWS_PER_SHARD)))]


def shard_key(shape: tuple[int, ...], shard: int) -> str:
    """The file of a create_rows_array array's shard `shard` (flat keys: one folder)."""
    return ".".join(("c", str(shard), *["0"] * (len(shape) - 1)))


def create_rows_array(
    path: str | os.PathLike[str], shape: tuple[int, ...], dtype: str, attrs: dict
) -> zarr.Array:
    """A per-image array: one image per chunk, ROWS_PER_SHARD images per shard file, every chunk
    zstd-compressed and crc32c-checksummed (zarr-python checks it on every read)."""
    return zarr.create_array(
        path,
        shape=shape,
        chunks=(1, *shape[1:]),
        shards=(ROWS_PER_SHARD, *shape[1:]),
        dtype=dtype,
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()],
        fill_value=0,
        chunk_key_encoding=KEY_ENCODING,
        attributes=attrs,
        zarr_format=3,
    )


@dataclasses.dataclass
class Prompts:
    """The prompt variants of a run, in store order, and their text-encoder embeddings."""

    names: list[str]  # variant names (prompts.variants)
    texts: list[str]  # their texts as a store's identity records them
    embeddings: torch.Tensor  # (P, 77, D)
    model_fingerprint: str


def write_prompts(prompts: Prompts, path: str | os.PathLike[str]) -> None:
    """prompts.safetensors: the embeddings, with names, texts and model as metadata."""
    meta = {
        "names": prompts.names,
        "prompts": prompts.texts,
        "model_fingerprint": prompts.model_fingerprint,
    }
    emb = prompts.embeddings.float().cpu().contiguous()
    # One metadata key: safetensors writes its metadata map in a random order, so several keys
    # would make equal prompts different files (and DVC re-run what reads them).
    save_file(
        {"embeddings": emb}, str(path), metadata={"prompts": json.dumps(meta, sort_keys=True)}
    )
    record_digest(path)


def read_prompts(encoded_dir: str | os.PathLike[str]) -> Prompts:
    """The Prompts written by encode, checked against their recorded digest."""
    path = Path(encoded_dir) / PROMPTS_NAME
    if not path.is_file():
        raise StoreError(f"{path}: prompt embeddings not found (run encode)")
    problem = digest_problem(path)
    if problem is not None:
        raise StoreError(f"{path}: {problem}; rerun encode")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        embeddings = load_file(str(path))["embeddings"]
    except (SafetensorError, OSError, KeyError) as e:
        raise StoreError(f"{path}: unreadable prompt embeddings ({e})") from None
    try:
        info = json.loads(meta["prompts"])
        names, texts, fp = info["names"], info["prompts"], info["model_fingerprint"]
    except (KeyError, ValueError, TypeError) as e:
        raise StoreError(f"{path}: missing prompt metadata ({e})") from e
    return Prompts(names, texts, embeddings, fp)
