"""Reading, resizing and writing dataset images and label maps, with clear errors naming the file."""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.core.errors import DataError

PathLike = str | os.PathLike[str]


def _open(path: PathLike, sha256: str | None = None) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{path}: content differs from the manifest's sha256 {sha256[:12]}... (the file "
            "changed after prepare); rerun prepare"
        )
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now so truncated files fail here, not later
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from exc
    return img


def read_image(path: PathLike, sha256: str | None = None) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8; with `sha256`, its file must have that content hash."""
    img = _open(path, sha256)
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        # 16-bit grayscale: Pillow's convert would clip every value above 255 to white.
        gray = np.round(np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode not in ("RGB", "RGBA", "L", "P", "LA", "PA", "1", "CMYK", "YCbCr"):
        raise DataError(
            f"{path}: unsupported image mode {img.mode} (8-bit RGB, gray or palette, or 16-bit "
            "gray PNG)"
        )
    return np.asarray(img.convert("RGB"))


def read_label(path: PathLike, sha256: str | None = None) -> np.ndarray:
    """A single-channel 8-bit label map (ids or palette indices) as (H, W) uint8; with `sha256`,
    its file must have that content hash."""
    img = _open(path, sha256)
    if img.mode not in ("L", "P"):
        raise DataError(f"{path}: label must be a single-channel 8-bit PNG, got mode {img.mode}")
    return np.asarray(img)


def read_train_ids(path: PathLike, sha256: str | None = None) -> np.ndarray:
    """A prepared label (train ids 0..18, 255 = ignore) as (H, W) uint8, checked: its content
    hash (when given) and its ids."""
    label = read_label(path, sha256)
    bad = (label >= NUM_CLASSES) & (label != IGNORE_INDEX)
    if bad.any():
        ids = sorted(int(v) for v in np.unique(label[bad]))[:10]
        raise DataError(f"{path}: label ids {ids} are not train ids (0..{NUM_CLASSES - 1}, 255)")
    return label


def read_label_u16(path: PathLike, channel: int = 0) -> np.ndarray:
    """Channel `channel` of a 16-bit label PNG (Synthia's GT/LABELS) as (H, W) uint16.

    Pillow reads 16-bit RGB PNGs only as 8-bit; OpenCV decodes them whole.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: unreadable or truncated 16-bit label PNG")
    arr = arr[..., ::-1] if arr.ndim == 3 else arr[..., None]  # BGR(A) -> RGB(A)
    if channel >= arr.shape[-1]:
        raise DataError(f"{path}: channel {channel} requested from a {arr.shape[-1]}-channel PNG")
    return np.ascontiguousarray(arr[..., channel].astype(np.uint16))


def resize(array: np.ndarray, size: Sequence[int], nearest: bool = False) -> np.ndarray:
    """(H, W[, 3]) uint8 resized to `size` (H, W): bilinear for images, nearest for labels, with
    OpenCV as mmcv's imresize (DIFF's Resize; PIL's bilinear filter antialiases, cv2's does not)."""
    h, w = int(size[0]), int(size[1])
    if array.shape[:2] == (h, w):
        return array
    method = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(array), (w, h), interpolation=method)


def fit_size(height: int, width: int, canvas: Sequence[int]) -> tuple[int, int]:
    """The size an image keeps inside `canvas` (H, W) with its aspect ratio, rounded as mmcv's
    rescale_size (int(x + 0.5)): GTA's 1914x1052 in 1280x704 is 1280x704."""
    scale = min(canvas[0] / height, canvas[1] / width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    return min(h, int(canvas[0])), min(w, int(canvas[1]))


def fit(array: np.ndarray, canvas: Sequence[int], nearest: bool = False) -> np.ndarray:
    """`array` resized to fit inside `canvas` with its aspect ratio (bilinear, or nearest)."""
    return resize(array, fit_size(array.shape[0], array.shape[1], canvas), nearest)


def canvas_tensor(image: np.ndarray, canvas: Sequence[int]) -> torch.Tensor:
    """A fitted (h, w, 3) uint8 image as float32 (3, H, W) in [-1, 1], padded bottom and right
    with 0 (mid gray, as mmseg's Pad after DIFF's normalization)."""
    out = torch.zeros(3, int(canvas[0]), int(canvas[1]))
    h, w = image.shape[:2]
    out[:, :h, :w] = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    return out


def load_image(path: PathLike, canvas: Sequence[int]) -> torch.Tensor:
    """An image fitted to `canvas` (aspect kept, bilinear, padded), float32 (3, H, W)."""
    return canvas_tensor(fit(read_image(path), canvas), canvas)


def load_label(path: PathLike, canvas: Sequence[int], sha256: str | None = None) -> np.ndarray:
    """A train-id label fitted to `canvas` (nearest, padded with 255 = ignore), uint8 (H, W)."""
    return pad_label(fit(read_train_ids(path, sha256), canvas, nearest=True), canvas)


def pad_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An (h, w) label padded bottom and right with 255 (ignore) to `size` (mmseg's Pad)."""
    out = np.full((int(size[0]), int(size[1])), IGNORE_INDEX, dtype=np.uint8)
    out[: label.shape[0], : label.shape[1]] = label
    return out


def png_bytes(array: np.ndarray, compress_level: int = 1) -> bytes:
    """An (H, W) or (H, W, 3) uint8 array as PNG bytes (deterministic for equal input)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buf, format="PNG", compress_level=compress_level
    )
    return buf.getvalue()


def write_png(path: PathLike, array: np.ndarray, compress_level: int = 1) -> None:
    """Write an (H, W) or (H, W, 3) uint8 array as PNG."""
    Path(path).write_bytes(png_bytes(array, compress_level))
