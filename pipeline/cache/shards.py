"""Whole chunks read from, and whole shards written to, the files of a sharded Zarr v3 array.

zarr-python spends ~1.5 ms of Python and thread hops per chunk; the default taps are 21 arrays
of 4-100 KB chunks, so per-sample reads and shard writes spent most of their time there. For
the layout FeatureStore creates (sharding_indexed, index at the end with crc32c, inner bytes +
blosc or zstd) a chunk is one read and one decode, a shard one encode per chunk and one file
replace. Files stay standard Zarr v3 (tests read them back through zarr); other layouts are
refused (ValueError) and go through zarr. Readers assume the array no longer changes.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from pipeline.core.errors import StoreError

_EMPTY = 2**64 - 1  # zarr's offset and length of a chunk that holds only the fill value
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class ShardedArrayFiles:
    """One sharded array's files: decoded chunks by chunk-grid coordinates, whole-shard writes."""

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
            or (inner[0].endian is not None and inner[0].endian.value != "little")
            or len(index) != 2
            or not isinstance(index[0], BytesCodec)
            or not isinstance(index[1], Crc32cCodec)
            or shard.index_location != ShardingCodecIndexLocation.end
            or getattr(meta.chunk_key_encoding, "separator", None) != "/"
        ):
            raise ValueError("sharding layout other than the one FeatureStore creates")
        c = inner[1]
        if isinstance(c, BloscCodec):
            self.codec = numcodecs.Blosc(
                cname=c.cname.value,
                clevel=c.clevel,
                shuffle=_SHUFFLE[c.shuffle.value],
                blocksize=c.blocksize,
                typesize=c.typesize,
            )
        elif isinstance(c, ZstdCodec):
            self.codec = numcodecs.Zstd(level=c.level, checksum=c.checksum)
        else:
            raise ValueError(f"chunk codec {type(c).__name__} not handled here")
        self.path = Path(path)
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.chunk_shape = tuple(int(s) for s in shard.chunk_shape)
        self.shard_shape = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
        self.per_shard = tuple(
            s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True)
        )
        self.fill_value = array.fill_value
        self._index: dict[tuple[int, ...], np.ndarray] = {}
        self._paths: dict[tuple[int, ...], str] = {}

    def shard_file(self, shard: tuple[int, ...]) -> Path:
        """The file of shard-grid coordinates `shard` (default chunk keys, '/' separator)."""
        return self.path.joinpath("c", *(str(s) for s in shard))

    def _shard_index(self, shard: tuple[int, ...], fd: int) -> np.ndarray:
        idx = self._index.get(shard)
        if idx is None:
            size = 16 * int(np.prod(self.per_shard)) + 4
            end = os.fstat(fd).st_size
            raw = os.pread(fd, size, max(end - size, 0))
            body, crc = raw[:-4], raw[-4:]
            if len(raw) != size or np.uint32(google_crc32c.value(body)).tobytes() != crc:
                raise StoreError(f"{self.shard_file(shard)}: shard index checksum mismatch")
            idx = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
            self._index[shard] = idx
        return idx

    def read(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk at chunk-grid `coords` (one index per dimension), decoded."""
        shard = tuple(c // p for c, p in zip(coords, self.per_shard, strict=True))
        local = np.ravel_multi_index(
            tuple(c % p for c, p in zip(coords, self.per_shard, strict=True)), self.per_shard
        )
        # Per chunk, pathlib and buffered file objects cost more than the read and the decode.
        path = self._paths.get(shard)
        if path is None:
            path = self._paths[shard] = str(self.shard_file(shard))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard never written holds only the fill value
            return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
        try:
            offset, length = (int(v) for v in self._shard_index(shard, fd)[local])
            if offset == _EMPTY:
                return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise StoreError(f"{path}: truncated shard ({len(data)} of {length} bytes of a chunk)")
        out = np.empty(self.chunk_shape, dtype=self.dtype)  # writable, unlike frombuffer
        self.codec.decode(data, out=out)
        return out

    def write_shard(self, shard: tuple[int, ...], values: np.ndarray) -> None:
        """Replace one whole shard; `values` may stop short at the array's end (edge shards)."""
        start = [s * n for s, n in zip(shard, self.shard_shape, strict=True)]
        want = tuple(
            min(n, size - s0)
            for n, size, s0 in zip(self.shard_shape, self.shape, start, strict=True)
        )
        if values.shape != want:
            raise StoreError(f"{self.shard_file(shard)}: shard values {values.shape} != {want}")
        values = np.ascontiguousarray(values, dtype=self.dtype)
        index = np.full((int(np.prod(self.per_shard)), 2), _EMPTY, dtype="<u8")
        parts, offset = [], 0
        for i, local in enumerate(np.ndindex(*self.per_shard)):
            sel = tuple(
                slice(j * c, (j + 1) * c) for j, c in zip(local, self.chunk_shape, strict=True)
            )
            chunk = values[sel]
            if chunk.size == 0:
                continue  # wholly beyond the array's end: no data, as zarr leaves it
            if chunk.shape != self.chunk_shape:  # an edge chunk is stored padded, as zarr does
                padded = np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
                padded[tuple(slice(0, n) for n in chunk.shape)] = chunk
                chunk = padded
            data = self.codec.encode(np.ascontiguousarray(chunk))
            parts.append(data)
            index[i] = (offset, len(data))
            offset += len(data)
        body = index.tobytes()
        parts += [body, np.uint32(google_crc32c.value(body)).tobytes()]
        path = self.shard_file(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The suffix zarr uses too: FeatureStore.remove_partial_files cleans up after a kill.
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p)
        os.replace(tmp, path)
        self._index.pop(shard, None)
