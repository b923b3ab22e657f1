"""Manifest tables: columns, dtypes, round trip and clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.core.errors import DataError
from pipeline.data.manifest import MANIFEST_COLUMNS, make_manifest, read_manifest, write_manifest

ROW = {
    "image": "a.png",
    "label": "a_l.png",
    "domain": "game",
    "split": "train",
    "height": 4,
    "width": 8,
    "sha256": "0" * 64,
    "label_sha256": "1" * 64,
}


def test_round_trip_keeps_columns_order_and_types(tmp_path):
    frame = make_manifest([ROW, {**ROW, "image": "b.png", "split": "val"}])
    write_manifest(frame, tmp_path / "m.parquet")
    back = read_manifest(tmp_path / "m.parquet")
    assert tuple(back.columns) == MANIFEST_COLUMNS
    assert list(back["split"]) == ["train", "val"]
    assert back["height"].dtype == "int64" and back["width"].iloc[0] == 8


def test_missing_file_missing_columns_empty_and_garbage_raise(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "nope.parquet")
    pd.DataFrame([{"image": "a.png"}]).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols.parquet.*missing columns"):
        read_manifest(tmp_path / "cols.parquet")
    make_manifest([]).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="no rows"):
        read_manifest(tmp_path / "empty.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="unreadable manifest"):
        read_manifest(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="missing columns"):
        write_manifest(pd.DataFrame([{"image": "a"}]), tmp_path / "w.parquet")
