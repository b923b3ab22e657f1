"""Manifests: one parquet table per domain, one row per image (the contract between stages)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.errors import DataError

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "domain",
    "split",
    "height",
    "width",
    "sha256",
    "label_sha256",
)
_DTYPES = {
    "image": "string",
    "label": "string",
    "domain": "string",
    "split": "string",
    "height": "int64",
    "width": "int64",
    "sha256": "string",
    "label_sha256": "string",
}


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    """A manifest frame from row dicts, with the contract's columns, order and dtypes."""
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return frame.astype(_DTYPES).reset_index(drop=True)


def write_manifest(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a manifest as parquet (callers wrap it in an atomic folder or path)."""
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: manifest is missing columns {missing}")
    frame[list(MANIFEST_COLUMNS)].to_parquet(path, index=False)


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest, checking it has the contract's columns and at least one row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (run the prepare stage)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: unreadable manifest ({exc})") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: manifest is missing columns {missing}")
    if frame.empty:
        raise DataError(f"{path}: manifest has no rows")
    return frame[list(MANIFEST_COLUMNS)].astype(_DTYPES)


# The encode index: every manifest's rows, domains in sorted name order; `set` is the encoded
# set holding an image (its domain's frames, or the source's crop draws) and `row` its position
# there (the row of that set's arrays in data/encoded and the stores).
INDEX_COLUMNS = [
    "domain",
    "split",
    "image",
    "label",
    "sha256",
    "label_sha256",
    "height",
    "width",
    "set",
    "row",
]


def build_index(
    manifest_paths: Sequence[str | os.PathLike[str]],
    set_of: Callable[[str, str], str] | None = None,
) -> pd.DataFrame:
    """Rows of all manifests, domains in sorted name order (each manifest's own order kept);
    `set_of(domain, split)` names each row's set (default: its domain)."""
    if not manifest_paths:
        raise DataError("no manifests (*.parquet) given; run prepare")
    frame = pd.concat([read_manifest(p) for p in manifest_paths], ignore_index=True)
    frame = frame.sort_values("domain", kind="stable").reset_index(drop=True)
    if set_of is None:
        frame["set"] = frame["domain"]
    else:
        frame["set"] = [set_of(d, s) for d, s in zip(frame["domain"], frame["split"], strict=True)]
    frame["set"] = frame["set"].astype("string")
    frame["row"] = frame.groupby("set").cumcount().astype("int64")
    return frame[INDEX_COLUMNS]
