"""The layout of data/encoded (written by encode): the image index, and per domain its VAE
latents and canvas-size labels; the prompt variants' embeddings.

```
data/encoded/index.parquet          every image: domain, split, paths, sha256, original size,
                                    row (within its domain), canvas and content size
data/encoded/<domain>/latents.zarr  (N_d, K, C, h, w): K encode draws per image
data/encoded/<domain>/labels.zarr   (N_d, H, W) uint8 train ids at the canvas (255 = pad)
data/encoded/prompts.safetensors    (P, 77, D) and the variants' names and texts
```
Domains have their own canvas (GTA 704x1280, Cityscapes 512x1024), hence arrays per domain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
import zarr
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from zarr.codecs import BloscCodec

from pipeline.core.errors import StoreError

INDEX_NAME = "index.parquet"
LATENTS_NAME = "latents.zarr"
LABELS_NAME = "labels.zarr"
PROMPTS_NAME = "prompts.safetensors"
ROWS_PER_SHARD = 64  # latents and labels are small: many images per shard file
GEOMETRY_COLUMNS = ["canvas_h", "canvas_w", "content_h", "content_w"]


def index_fingerprint(sha256s: Iterable[str]) -> str:
    """One hash for the ordered list of image content hashes a store is indexed by."""
    h = hashlib.sha256()
    for s in sha256s:
        h.update(str(s).encode())
        h.update(b"\n")
    return h.hexdigest()


def read_index(encoded_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The global image index written by encode."""
    path = Path(encoded_dir) / INDEX_NAME
    if not path.is_file():
        raise StoreError(f"{path}: image index not found (run encode)")
    return pd.read_parquet(path)


def domain_index(index: pd.DataFrame, domain: str) -> pd.DataFrame:
    """The rows of one domain, in the order of its arrays."""
    rows = index[index["domain"] == domain]
    if rows.empty:
        raise StoreError(f"no images of domain {domain!r} in the encoded index")
    return rows.sort_values("row").reset_index(drop=True)


def domain_rows(index: pd.DataFrame, domain: str, split: str | None = None) -> list[int]:
    """Rows (within the domain's arrays) of one domain, optionally of one split."""
    rows = domain_index(index, domain)
    if split is not None:
        rows = rows[rows["split"] == split]
    return [int(r) for r in rows["row"]]


def source_domain(index: pd.DataFrame) -> str:
    """The domain with a train split (prepare gives only the source one)."""
    domains = sorted(set(index.loc[index["split"] == "train", "domain"]))
    if len(domains) != 1:
        raise StoreError(f"the encoded index has train images of domains {domains}, not one source")
    return domains[0]


def target_domains(index: pd.DataFrame) -> list[str]:
    """Every domain but the source, sorted."""
    return sorted(set(index["domain"]) - {source_domain(index)})


def domain_dir(encoded_dir: str | os.PathLike[str], domain: str) -> Path:
    return Path(encoded_dir) / domain


def open_latents(encoded_dir: str | os.PathLike[str], domain: str) -> zarr.Array:
    """A domain's (N_d, K, C, h, w) latents, read-only."""
    return _open_rows(domain_dir(encoded_dir, domain) / LATENTS_NAME, "latents")


def open_labels(encoded_dir: str | os.PathLike[str], domain: str) -> zarr.Array:
    """A domain's (N_d, H, W) uint8 train-id labels at its canvas, read-only."""
    return _open_rows(domain_dir(encoded_dir, domain) / LABELS_NAME, "labels")


def encoded_resolution(encoded_dir: str | os.PathLike[str], domain: str) -> list[int]:
    """The canvas (H, W) a domain's images were encoded at."""
    return [int(v) for v in open_labels(encoded_dir, domain).attrs["resolution"]]


def _open_rows(path: Path, what: str) -> zarr.Array:
    if not path.exists():
        raise StoreError(f"{path}: {what} not found (run encode)")
    return zarr.open_array(path, mode="r")


def create_rows_array(
    path: str | os.PathLike[str], shape: tuple[int, ...], dtype: str, attrs: dict
) -> zarr.Array:
    """A per-image array: one image per chunk, ROWS_PER_SHARD images per shard file."""
    return zarr.create_array(
        path,
        shape=shape,
        chunks=(1, *shape[1:]),
        shards=(ROWS_PER_SHARD, *shape[1:]),
        dtype=dtype,
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
        fill_value=0,
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
        "names": json.dumps(prompts.names),
        "prompts": json.dumps(prompts.texts),
        "model_fingerprint": prompts.model_fingerprint,
    }
    emb = prompts.embeddings.float().cpu().contiguous()
    save_file({"embeddings": emb}, str(path), metadata=meta)


def read_prompts(encoded_dir: str | os.PathLike[str]) -> Prompts:
    """The Prompts written by encode."""
    path = Path(encoded_dir) / PROMPTS_NAME
    if not path.is_file():
        raise StoreError(f"{path}: prompt embeddings not found (run encode)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        names, texts = json.loads(meta["names"]), json.loads(meta["prompts"])
        fp = meta["model_fingerprint"]
    except (KeyError, ValueError) as e:
        raise StoreError(f"{path}: missing prompt metadata ({e})") from e
    return Prompts(names, texts, load_file(str(path))["embeddings"], fp)
