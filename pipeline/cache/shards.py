"""Whole chunks read from, and whole shards written to, the files of a sharded Zarr v3 array.

zarr-python spends ~1.5 ms of Python and thread hops per chunk; the default taps are 21 arrays
of 4-100 KB chunks, so per-sample reads and shard writes spent most of their time there. For
the layout FeatureStore creates (sharding_indexed, index at the end with crc32c; inner chain
bytes, an optional blosc or zstd, crc32c) a chunk is one `pread`, one checksum and one decode,
a shard one encode per chunk and one file replace. Files stay standard Zarr v3 (tests read
them back through zarr and xarray); other layouts are refused (ValueError) and go through zarr.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from operator import floordiv, mod, mul
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
READ_AHEAD = 1  # shards a read in order asks the kernel for beyond the current one
# Chunk keys c.<i>.<j>... of every array the pipeline writes, in one folder per array: DVC walks
# (and matches .dvcignore against) every folder of an output, and "/" keys made a chain of
# folders per shard file (benchmarks/dvc_scale.py).
KEY_ENCODING = {"name": "default", "separator": "."}


class DiskFullError(StoreError):
    """A shard did not fit on its filesystem (nothing of it was left behind)."""


def checksum(parts: Iterable[bytes]) -> int:
    """A nonzero 32-bit checksum of byte strings in order: a sha256 of their crc32c's (fast,
    and not a crc of the stream: each chunk ends with its own crc32c, and any data followed by
    its crc32c has the same crc32c)."""
    digest = hashlib.sha256(b"".join(map(crc32c, parts))).digest()
    return int.from_bytes(digest[:4], "little") or 1


def crc32c(data: bytes | np.ndarray) -> bytes:
    """The 4 little-endian bytes zarr's crc32c codec appends (of a C-contiguous array: its
    buffer, with no uint8 view needed)."""
    return google_crc32c.value(data).to_bytes(4, "little")


def _numcodec(codec: object) -> numcodecs.abc.Codec:
    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc(
            cname=codec.cname.value,
            clevel=codec.clevel,
            shuffle=_SHUFFLE[codec.shuffle.value],
            blocksize=codec.blocksize,
            typesize=codec.typesize,
        )
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    raise ValueError(f"chunk codec {type(codec).__name__} not handled here")


class ShardedArrayFiles:
    """One sharded array's files: decoded chunks by chunk-grid coordinates, whole-shard writes.

    `name` (the array's path in its store) and `store` only make error messages say where.
    With `keep_open` (readers of stores that do not change under them) the current shard's
    file stays open between chunks, and a read that moves on to the next shard in order asks
    the kernel to read that shard ahead (posix_fadvise WILLNEED): a split read in row order
    (evaluate, a preload, a DataLoader batch) then costs one open and one readahead per shard
    file instead of an open, a seek-bound read and a close per chunk; random access (training
    streamed) reads only its chunks (benchmarks/store_io.py measures both).
    """

    def __init__(
        self,
        array: zarr.Array,
        path: str | os.PathLike[str],
        name: str = "",
        store: str = "",
        keep_open: bool = False,
    ) -> None:
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            raise ValueError("not a sharded array")
        shard = codecs[0]
        inner, index = list(shard.codecs), tuple(shard.index_codecs)
        if (
            not inner
            or not isinstance(inner[0], BytesCodec)
            or (inner[0].endian is not None and inner[0].endian.value != "little")
            or len(index) != 2
            or not isinstance(index[0], BytesCodec)
            or not isinstance(index[1], Crc32cCodec)
            or shard.index_location != ShardingCodecIndexLocation.end
            or getattr(meta.chunk_key_encoding, "separator", None) not in ("/", ".")
        ):
            raise ValueError("sharding layout other than the one FeatureStore creates")
        rest = inner[1:]
        self.checksum = bool(rest) and isinstance(rest[-1], Crc32cCodec)
        if self.checksum:
            rest = rest[:-1]
        if len(rest) > 1:
            raise ValueError("more than one compressor")
        self.codec = _numcodec(rest[0]) if rest else None
        self.path = Path(path)
        self.separator = meta.chunk_key_encoding.separator
        self.where = f"{store}: array {name}" if store else str(self.path)
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.chunk_shape = tuple(int(s) for s in shard.chunk_shape)
        self.chunk_bytes = int(np.prod(self.chunk_shape)) * self.dtype.itemsize
        self.shard_shape = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
        self.per_shard = tuple(
            s // c for s, c in zip(self.shard_shape, self.chunk_shape, strict=True)
        )
        self.grid = tuple(-(-n // s) for n, s in zip(self.shape, self.shard_shape, strict=True))
        # Row-major strides of a chunk's position inside its shard (the shard index's order).
        self._local_strides = tuple(
            int(np.prod(self.per_shard[i + 1 :])) for i in range(len(self.per_shard))
        )
        self.fill_value = array.fill_value
        self._index: dict[tuple[int, ...], np.ndarray] = {}
        self._paths: dict[tuple[int, ...], str] = {}
        self.keep_open = keep_open
        self._open: tuple[tuple[int, ...], int] | None = None  # (shard, fd) kept open
        self._next: tuple[int, ...] | None = None  # the chunk a read in order asks for next

    def shard_file(self, shard: tuple[int, ...]) -> Path:
        """The file of shard-grid coordinates `shard` (default chunk keys: c.0.0 or c/0/0)."""
        return self.path / self.separator.join(("c", *map(str, shard)))

    def shards(self) -> list[tuple[int, ...]]:
        """Shard-grid coordinates of every shard, in C order."""
        return list(np.ndindex(*self.grid))

    def _fail(self, path: str | Path, problem: str) -> StoreError:
        return StoreError(f"{self.where}: shard file {path}: {problem}")

    def _shard_index(self, shard: tuple[int, ...], fd: int, path: str) -> list[tuple[int, int]]:
        idx = self._index.get(shard)
        if idx is None:
            size = 16 * int(np.prod(self.per_shard)) + 4
            end = os.fstat(fd).st_size
            raw = os.pread(fd, size, max(end - size, 0))
            if len(raw) != size or crc32c(raw[:-4]) != raw[-4:]:
                raise self._fail(
                    path, "shard index fails its crc32c checksum (corrupt or truncated file)"
                )
            table = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
            ends = table[table[:, 0] != _EMPTY].sum(axis=1)
            if ends.size and int(ends.max()) > end - size:
                raise self._fail(path, f"truncated ({end} bytes; chunks end at {ends.max()})")
            idx = self._index[shard] = [(int(o), int(n)) for o, n in table]
        return idx

    def _decode(self, data: bytes, path: str, local: int) -> np.ndarray:
        body = np.frombuffer(data, np.uint8)  # no copy
        if self.checksum:
            body = body[:-4]
            if len(data) < 4 or crc32c(body) != data[-4:]:
                raise self._fail(path, f"chunk {local} fails its crc32c checksum (corrupt data)")
        out = np.empty(self.chunk_shape, dtype=self.dtype)  # writable, unlike frombuffer
        try:
            if self.codec is None:
                if len(body) != self.chunk_bytes:
                    raise ValueError(f"{len(body)} bytes, expected {self.chunk_bytes}")
                out.reshape(-1).view(np.uint8)[:] = body
            else:
                self.codec.decode(body, out=out)
        except Exception as e:  # numcodecs raises RuntimeError/ValueError for a bad header
            raise self._fail(path, f"chunk {local} cannot be decoded ({e})") from None
        return out

    def read(self, coords: tuple[int, ...], required: bool = False) -> np.ndarray:
        """The chunk at chunk-grid `coords`, decoded and checked. A missing shard file holds the
        fill value, unless `required` (its shard is marked written): then it is an error."""
        # Plain int arithmetic (map over operator): numpy's ravel_multi_index and generator
        # expressions cost more than the read of a small chunk.
        shard = tuple(map(floordiv, coords, self.per_shard))
        local = sum(map(mul, map(mod, coords, self.per_shard), self._local_strides))
        in_order = self._next is None or coords == self._next
        self._next = (coords[0] + 1, *coords[1:])
        return self.read_local(shard, local, in_order and local == 0, required)

    def read_local(
        self, shard: tuple[int, ...], local: int, ahead: bool = False, required: bool = False
    ) -> np.ndarray:
        """The chunk at `local` (its place in the shard index) of shard `shard`, decoded and
        checked; `ahead`: a read in row order entering this shard (`_fd` reads ahead)."""
        out = np.empty(self.chunk_shape, dtype=self.dtype)
        self.read_local_into(shard, local, [out.reshape(-1)], ahead, required)
        return out

    def read_local_into(
        self,
        shard: tuple[int, ...],
        local: int,
        parts: list[np.ndarray],
        ahead: bool = False,
        required: bool = False,
    ) -> None:
        """read_local into `parts`: C-contiguous arrays of the chunk's dtype that together hold
        its elements in order (the taps of a group chunk, each where its sample wants it). An
        uncompressed chunk is scattered there by one `preadv` (measured: copying a sample's
        views together cost more than reading them; benchmarks/recipe_reads.py)."""
        # Per chunk, pathlib and buffered file objects cost more than the read and the decode.
        path = self._paths.get(shard)
        if path is None:
            path = self._paths[shard] = str(self.shard_file(shard))
        try:
            fd = self._fd(shard, path, ahead)
        except FileNotFoundError:
            if required:
                raise self._fail(
                    path,
                    "missing, but the store's done mask marks its shard "
                    "written; rerun extract to recompute it",
                ) from None
            for p in parts:
                p.fill(self.fill_value)
            return
        try:
            offset, length = self._shard_index(shard, fd, path)[local]
            if offset == _EMPTY:
                for p in parts:
                    p.fill(self.fill_value)
                return
            if self.codec is None and length == self.chunk_bytes + 4 * self.checksum:
                tail = bytearray(4 * self.checksum)
                got = os.preadv(fd, [*parts, tail] if self.checksum else parts, offset)
                if got != length:
                    raise self._fail(path, f"truncated ({got} of {length} bytes of chunk {local})")
                if self.checksum:
                    crc = 0
                    for p in parts:
                        crc = google_crc32c.extend(crc, p)
                    if crc.to_bytes(4, "little") != tail:
                        raise self._fail(
                            path, f"chunk {local} fails its crc32c checksum (corrupt data)"
                        )
                return
            data = os.pread(fd, length, offset)
        finally:
            if not self.keep_open:
                os.close(fd)
        if len(data) != length:
            raise self._fail(path, f"truncated ({len(data)} of {length} bytes of chunk {local})")
        flat, start = self._decode(data, path, local).reshape(-1), 0
        for p in parts:
            p.reshape(-1)[:] = flat[start : start + p.size]
            start += p.size

    def _fd(self, shard: tuple[int, ...], path: str, ahead: bool) -> int:
        """A file descriptor of a shard's file: kept open (with readahead when `ahead`) or a
        fresh one the caller closes."""
        if not self.keep_open:
            return os.open(path, os.O_RDONLY)
        if self._open is not None and self._open[0] == shard:
            return self._open[1]
        self.close()
        fd = os.open(path, os.O_RDONLY)
        self._open = (shard, fd)
        if ahead:  # this shard and the next ones: their reads overlap the decoding of this one
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            for k in range(1, READ_AHEAD + 1):
                following = (shard[0] + k, *shard[1:])
                if following[0] >= self.grid[0]:
                    break
                try:
                    nfd = os.open(self.shard_file(following), os.O_RDONLY)
                except FileNotFoundError:
                    break
                os.posix_fadvise(nfd, 0, 0, os.POSIX_FADV_WILLNEED)
                os.close(nfd)
        return fd

    def close(self) -> None:
        """Close the shard file kept open, if any."""
        if self._open is not None:
            os.close(self._open[1])
            self._open = None

    def __del__(self) -> None:
        self.close()

    def check_shard(self, shard: tuple[int, ...]) -> str | None:
        """What is wrong with one existing shard file (index, every chunk), or None."""
        path = str(self.shard_file(shard))
        self._index.pop(shard, None)
        try:
            with open(path, "rb") as f:
                data = f.read()
                idx = self._shard_index(shard, f.fileno(), path)
            for local, (offset, length) in enumerate(idx):
                if int(offset) != _EMPTY:
                    self._decode(data[int(offset) : int(offset) + int(length)], path, local)
        except StoreError as e:
            return str(e).split(f"shard file {path}: ", 1)[-1]
        finally:
            self._index.pop(shard, None)
        return None

    def encode_shard(self, shard: tuple[int, ...], values: np.ndarray) -> list[bytes]:
        """The bytes of one whole shard; `values` may stop short at the array's end."""
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
            chunk = np.ascontiguousarray(chunk)
            data = chunk.tobytes() if self.codec is None else self.codec.encode(chunk)
            parts.append(data)
            if self.checksum:
                parts.append(crc32c(data))
            index[i] = (offset, len(data) + 4 * self.checksum)
            offset += len(data) + 4 * self.checksum
        body = index.tobytes()
        return [*parts, body, crc32c(body)]

    def write_shard(self, shard: tuple[int, ...], values: np.ndarray) -> int:
        """Replace one whole shard: written to `<file>.partial`, then renamed over the file, so a
        file is never changed in place (DVC's linked cache copies stay intact). Returns a
        checksum of the file's bytes."""
        parts = self.encode_shard(shard, values)
        path = self.shard_file(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The suffix zarr uses too: FeatureStore.remove_partial_files cleans up after a kill.
        tmp = path.with_name(path.name + ".partial")
        try:
            with open(tmp, "wb") as f:
                for p in parts:
                    f.write(p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"{self.where}: no space left for shard file {path} "
                    f"({sum(len(p) for p in parts)} bytes)"
                ) from None
            raise
        os.replace(tmp, path)
        self._index.pop(shard, None)
        return checksum(parts)
