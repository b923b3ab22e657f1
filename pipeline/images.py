"""Reading and writing dataset images and label maps, with clear errors naming the file."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError

PathLike = str | os.PathLike[str]


def _open(path: PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = Image.open(path)
        img.load()  # decode now so truncated files fail here, not later
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from exc
    return img


def read_image(path: PathLike) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8."""
    img = _open(path)
    if img.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "YCbCr", "I;16", "I"):
        raise DataError(f"{path}: unsupported image mode {img.mode}")
    return np.asarray(img.convert("RGB"))


def read_label(path: PathLike) -> np.ndarray:
    """A single-channel 8-bit label map (ids or palette indices) as (H, W) uint8."""
    img = _open(path)
    if img.mode not in ("L", "P"):
        raise DataError(f"{path}: label must be a single-channel 8-bit PNG, got mode {img.mode}")
    return np.asarray(img)


def read_label_u16(path: PathLike, channel: int = 0) -> np.ndarray:
    """Channel `channel` of a 16-bit label PNG (e.g. Synthia's GT/LABELS) as (H, W) uint16.

    Pillow reads 16-bit RGB PNGs only as 8-bit, so the PNG is decoded here with zlib and numpy.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:  # OpenCV decodes 16-bit PNGs fast when it is installed; the fallback is pure numpy
        import cv2  # type: ignore[import-not-found]
    except ImportError:
        cv2 = None
    if cv2 is not None:
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise DataError(f"{path}: unreadable or truncated 16-bit label PNG")
        arr = arr[..., ::-1] if arr.ndim == 3 else arr[..., None]  # BGR(A) -> RGB(A)
        if channel >= arr.shape[-1]:
            raise DataError(
                f"{path}: channel {channel} requested from a {arr.shape[-1]}-channel PNG"
            )
        return np.ascontiguousarray(arr[..., channel].astype(np.uint16))
    data = path.read_bytes()
    try:
        return _decode_png16(data, channel)
    except (ValueError, zlib.error, IndexError) as exc:
        raise DataError(f"{path}: unreadable or truncated 16-bit label PNG ({exc})") from exc


def _decode_png16(data: bytes, channel: int) -> np.ndarray:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated chunk header")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError("truncated chunk")
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError("missing IHDR or IDAT")
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, color, interlace = header[8], header[9], header[12]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if channels is None or depth not in (8, 16) or interlace != 0:
        raise ValueError(
            f"unsupported PNG (bit depth {depth}, color type {color}, interlace {interlace})"
        )
    if channel >= channels:
        raise ValueError(f"channel {channel} requested from a {channels}-channel PNG")
    bpp = channels * depth // 8
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError("decompressed size does not match the header")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):  # PNG filters are sequential per row; vectorized within a row
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype == 1:  # Sub: a running sum per byte lane
            cur = np.empty(stride, dtype=np.int32)
            for b in range(bpp):
                cur[b::bpp] = np.cumsum(line[b::bpp]) & 0xFF
        elif ftype in (3, 4):
            cur = np.empty(stride, dtype=np.int32)
            for x0 in range(0, stride, bpp):  # left neighbour dependence: step one pixel
                left = cur[x0 - bpp : x0] if x0 else np.zeros(bpp, np.int32)
                up = prev[x0 : x0 + bpp]
                if ftype == 1:
                    pred = left
                elif ftype == 3:
                    pred = (left + up) >> 1
                else:
                    ul = prev[x0 - bpp : x0] if x0 else np.zeros(bpp, np.int32)
                    p = left + up - ul
                    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - ul)
                    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
                cur[x0 : x0 + bpp] = (line[x0 : x0 + bpp] + pred) & 0xFF
        else:
            raise ValueError(f"bad filter type {ftype} in row {y}")
        out[y] = cur
        prev = cur
    if depth == 16:
        values = out.reshape(height, width, channels, 2).astype(np.uint16)
        values = (values[..., 0] << 8) | values[..., 1]
    else:
        values = out.reshape(height, width, channels).astype(np.uint16)
    return np.ascontiguousarray(values[..., channel])


def write_png(path: PathLike, array: np.ndarray, compress_level: int = 1) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG (deterministic bytes for equal input)."""
    Image.fromarray(np.ascontiguousarray(array)).save(
        path, format="PNG", compress_level=compress_level
    )


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
