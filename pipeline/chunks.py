"""Whole-chunk reads straight from the shard files of a Zarr v3 array, bypassing zarr's pipeline.

zarr-python spends ~1.5 ms of Python and thread hops per chunk read; the store's default taps
have 21 arrays of 4-100 KB chunks, so a per-sample loader spent most of its time there. A
chunk of the layout FeatureStore writes (sharding_indexed, index at the end with crc32c, inner
bytes + blosc or zstd) is one read and one decode. Other layouts are refused (ValueError) and
read through zarr. Arrays must not change while read: only complete stores are read this way.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc, zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from pipeline.errors import StoreError

_EMPTY = 2**64 - 1  # zarr's offset/length of a chunk that was never written


class ChunkReader:
    """Decoded chunks of one sharded array, by chunk-grid coordinates."""

    def __init__(self, array: zarr.Array, path: str | os.PathLike[str]) -> None:
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            raise ValueError("not a sharded array")
        shard = codecs[0]
        inner, index = tuple(shard.codecs), tuple(shard.index_codecs)
        if (
            len(inner) != 2
            or not isinstance(inner[0], BytesCodec)
            or not isinstance(inner[1], BloscCodec | ZstdCodec)
            or len(index) != 2
            or not isinstance(index[0], BytesCodec)
            or not isinstance(index[1], Crc32cCodec)
            or shard.index_location != ShardingCodecIndexLocation.end
            or getattr(meta.chunk_key_encoding, "separator", None) != "/"
            or (inner[0].endian is not None and inner[0].endian.value != "little")
        ):
            raise ValueError("sharding layout other than the one FeatureStore writes")
        self.path = Path(path)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.chunk_shape = tuple(int(c) for c in shard.chunk_shape)
        self.shard_shape = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
        self.per_shard = tuple(
            s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True)
        )
        self.fill_value = array.fill_value
        self._decompress = blosc.decompress if isinstance(inner[1], BloscCodec) else zstd.decompress
        self._index: dict[tuple[int, ...], np.ndarray] = {}

    def _shard_file(self, shard: tuple[int, ...]) -> Path:
        return self.path.joinpath("c", *(str(s) for s in shard))

    def _shard_index(self, shard: tuple[int, ...], f) -> np.ndarray:
        idx = self._index.get(shard)
        if idx is None:
            n = int(np.prod(self.per_shard))
            size = 16 * n + 4
            f.seek(-size, os.SEEK_END)
            raw = f.read(size)
            body, crc = raw[:-4], raw[-4:]
            if np.uint32(google_crc32c.value(body)).tobytes() != crc:
                raise StoreError(f"{self._shard_file(shard)}: shard index checksum mismatch")
            idx = np.frombuffer(body, dtype="<u8").reshape(n, 2)
            self._index[shard] = idx
        return idx

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk at chunk-grid `coords` (one index per dimension), decoded."""
        shard = tuple(c // p for c, p in zip(coords, self.per_shard, strict=True))
        local = np.ravel_multi_index(
            tuple(c % p for c, p in zip(coords, self.per_shard, strict=True)), self.per_shard
        )
        path = self._shard_file(shard)
        try:
            with open(path, "rb") as f:
                offset, length = (int(v) for v in self._shard_index(shard, f)[local])
                if offset == _EMPTY:
                    return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:  # a shard never written holds only the fill value
            return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
        if len(data) != length:
            raise StoreError(f"{path}: truncated shard ({len(data)} of {length} bytes of a chunk)")
        return np.frombuffer(self._decompress(data), dtype=self.dtype).reshape(self.chunk_shape)
