"""The layout of data/encoded (written by the encode stage) and its readers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch
import zarr
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from zarr.codecs import BloscCodec

from pipeline.diffusion import DiffusionModel, encode_prompts
from pipeline.errors import DataError, StoreError

INDEX_COLUMNS = ["domain", "split", "image", "label", "sha256", "height", "width"]
INDEX_NAME = "index.parquet"
LATENTS_NAME = "latents.zarr"
LABELS_NAME = "labels.zarr"
PROMPTS_NAME = "prompts.safetensors"
ROWS_PER_SHARD = 64  # latents and labels are small: many images per shard file


def read_prompts(path: str | os.PathLike[str]) -> tuple[list[str], torch.Tensor, str]:
    """(prompt texts, embeddings (P, 77, D), model fingerprint) from prompts.safetensors."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: prompt embeddings not found (run encode)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        prompts = json.loads(meta["prompts"])
        fp = meta["model_fingerprint"]
    except (KeyError, ValueError) as e:
        raise StoreError(f"{path}: missing prompt metadata ({e})") from e
    return prompts, load_file(str(path))["embeddings"], fp


def read_index(encoded_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The global image index written by encode (row position = global image index)."""
    path = Path(encoded_dir) / INDEX_NAME
    if not path.is_file():
        raise StoreError(f"{path}: image index not found (run encode)")
    return pd.read_parquet(path)


def open_latents(encoded_dir: str | os.PathLike[str]) -> zarr.Array:
    """The (N, 4, h, w) latents array, read-only."""
    path = Path(encoded_dir) / LATENTS_NAME
    if not path.exists():
        raise StoreError(f"{path}: latents not found (run encode)")
    return zarr.open_array(path, mode="r")


def open_labels(encoded_dir: str | os.PathLike[str]) -> zarr.Array:
    """The (N, H, W) uint8 train-id labels at the encode resolution, read-only."""
    path = Path(encoded_dir) / LABELS_NAME
    if not path.exists():
        raise StoreError(f"{path}: labels not found (run encode)")
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


def save_prompts(model: DiffusionModel, prompts: list[str], path: str | os.PathLike[str]) -> None:
    """Embeddings (P, 77, D) of the prompt variants, with the prompt texts as metadata."""
    if not prompts:
        raise DataError("encode.prompts must list at least one prompt (the empty prompt is '')")
    with torch.inference_mode():
        emb = encode_prompts(model, prompts).float().cpu().contiguous()
    meta = {"prompts": json.dumps(prompts), "model_fingerprint": model.fingerprint}
    save_file({"embeddings": emb}, str(path), metadata=meta)
