"""How training samples are drawn (the `sampling` params group), as mmseg draws them for DIFF:
random crops, retried while one class covers too much of them (cat_max_ratio), flips, and
DAFormer's rare-class sampling (RCS).

Encode uses them for crop draws (the crop is cut before the UNet runs, as in DIFF); training
uses them to pick each sample's image and draw, and to cut feature-space crops of whole frames.
DIFF's code: mmseg/datasets/pipelines/transforms.py:502-568 (RandomCrop),
mmseg/datasets/uda_dataset.py:20-44 (class probabilities), 128-144 (re-crops).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np
from pydantic import Field
from pydantic.dataclasses import dataclass

from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.core.errors import ConfigError
from pipeline.core.params import STRICT

CROP_TRIES = 10  # mmseg RandomCrop's cat_max_ratio checks, and DAFormer's re-crops


def pixel_counts(label: np.ndarray) -> np.ndarray:
    """(classes,) pixel counts of one label (255 ignored)."""
    flat = np.asarray(label).reshape(-1)
    return np.bincount(flat[flat != IGNORE_INDEX], minlength=NUM_CLASSES)[:NUM_CLASSES]


def crop_offset(
    rng: np.random.Generator, area: tuple[int, int], crop: tuple[int, int], grid: int = 1
) -> tuple[int, int]:
    """(y0, x0) uniform over the offsets of a `crop` inside `area` (mmseg get_crop_bbox: any pixel;
    `grid` > 1 keeps offsets on a feature map's grid). A crop larger than the area starts at 0."""
    my = max(area[0] - crop[0], 0) // grid
    mx = max(area[1] - crop[1], 0) // grid
    return int(rng.integers(my + 1)) * grid, int(rng.integers(mx + 1)) * grid


def dominated(label: np.ndarray, cat_max_ratio: float) -> bool:
    """True when mmseg's cat_max_ratio rejects a crop's label: fewer than two classes, or one
    covering at least `cat_max_ratio` of the labeled pixels."""
    classes, cnt = np.unique(label, return_counts=True)
    cnt = cnt[classes != IGNORE_INDEX]
    return not (len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio)


def random_crop(
    rng: np.random.Generator,
    label: np.ndarray,
    area: tuple[int, int],
    crop: tuple[int, int],
    cat_max_ratio: float,
    grid: int = 1,
) -> tuple[int, int]:
    """mmseg RandomCrop: a box; with cat_max_ratio < 1 up to 10 checks of the label's crop, a new
    box after each failed one (so the 11th box, if drawn, is kept unchecked)."""
    y0, x0 = crop_offset(rng, area, crop, grid)
    if cat_max_ratio < 1:
        for _ in range(CROP_TRIES):
            if not dominated(label[y0 : y0 + crop[0], x0 : x0 + crop[1]], cat_max_ratio):
                break
            y0, x0 = crop_offset(rng, area, crop, grid)
    return y0, x0


@dataclasses.dataclass(frozen=True)
class RareClassSampling:
    """DAFormer's rare-class sampling (the sampling group's rcs_* keys)."""

    temperature: float
    min_pixels: int  # an image counts for a class when it holds more pixels of it than this
    min_crop_ratio: float  # re-crop until a crop holds min_pixels x this of the class; 0: never

    @property
    def wanted(self) -> float:
        """Pixels of the sampled class a crop must hold (more than) to end the re-crops."""
        return self.min_pixels * self.min_crop_ratio


@dataclasses.dataclass(frozen=True)
class CropSampling:
    """How crop draws are cut at encode (part of the stores' identity: `encoding`)."""

    flip: bool  # mmseg RandomFlip, probability 0.5
    cat_max_ratio: float  # mmseg RandomCrop's retries
    rcs: RareClassSampling | None  # rare-class re-crops, or None when off


@dataclass(config=STRICT)
class SamplingConfig:
    """The `sampling` group: how training samples are drawn. Encode applies it when it cuts crop
    draws (`encode.crop`), train to whole frames (feature-space crops, flips, RCS)."""

    # [h, w] feature-space crops of whole frames (multiples of the largest stride); null: whole
    # images. Not with crop draws (encode.crop), which are read whole.
    feature_crop: (
        Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)] | None
    )
    cat_max_ratio: Annotated[float, Field(gt=0, le=1)]  # < 1: retry crops one class dominates
    flip: bool
    rare_class_sampling: bool
    rcs_temperature: Annotated[float, Field(gt=0)]
    rcs_min_pixels: Annotated[int, Field(ge=0)]  # an image counts for class c above this
    rcs_min_crop_ratio: Annotated[float, Field(ge=0)]  # re-crop (10 tries) until the crop
    # holds min_pixels x this of c; 0: no re-crops

    def rcs(self) -> RareClassSampling | None:
        """Rare-class sampling's settings, or None when off."""
        if not self.rare_class_sampling:
            return None
        return RareClassSampling(self.rcs_temperature, self.rcs_min_pixels, self.rcs_min_crop_ratio)

    def crop_sampling(self) -> CropSampling:
        """What encode applies to crop draws."""
        return CropSampling(self.flip, self.cat_max_ratio, self.rcs())


class RcsTable:
    """Which class and image each rare-class-sampled sample takes, from per-image pixel counts.

    As DAFormer's get_rcs_class_probs: P(c) = softmax((1 - f_c) / T) over the classes present,
    f_c the share of all labeled pixels (summed over every image, uda_dataset.py:20-44); then an
    image uniformly among those holding more than min_pixels of c (uda_dataset.py:76-79).
    DAFormer asserts every present class has such an image; a class without one is dropped here
    and the others renormalized.
    """

    def __init__(self, counts: np.ndarray, rcs: RareClassSampling) -> None:
        self.rcs = rcs
        freq = counts.sum(axis=0).astype(np.float64)
        present = freq > 0
        if not present.any():
            raise ConfigError("rare-class sampling: the training labels hold no labeled pixel")
        logits = (1.0 - freq[present] / freq.sum()) / rcs.temperature
        p = np.exp(logits - logits.max())
        probs = np.zeros(len(freq))
        probs[present] = p / p.sum()
        eligible = counts > rcs.min_pixels
        probs[~eligible.any(axis=0)] = 0.0
        if probs.sum() == 0:
            raise ConfigError(
                f"sampling.rcs_min_pixels {rcs.min_pixels}: no training image holds more pixels "
                "than that of any class"
            )
        self.class_probs = probs / probs.sum()
        self.images_with = [np.flatnonzero(eligible[:, c]) for c in range(counts.shape[1])]
        self.eligible = eligible

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(class, image position) of one sample."""
        c = int(rng.choice(len(self.class_probs), p=self.class_probs))
        return c, int(rng.choice(self.images_with[c]))

    def class_given_image(self, i: int) -> np.ndarray:
        """P(c | image i) of the draw above: P(c) / |images with c| over the classes i counts for."""
        sizes = np.array([max(len(s), 1) for s in self.images_with], dtype=np.float64)
        p = self.class_probs / sizes * self.eligible[i]
        return p / p.sum() if p.sum() > 0 else p


def rcs_crop(
    rng: np.random.Generator,
    label: np.ndarray,
    area: tuple[int, int],
    crop: tuple[int, int],
    cat_max_ratio: float,
    cls: int | None,
    wanted: float,
    grid: int = 1,
) -> tuple[int, int]:
    """A random crop, re-cropped (10 times at most) until it holds more than `wanted` pixels of
    class `cls` (DAFormer's get_rare_class_source_sample; no re-crops when cls is None or
    wanted is 0)."""
    y0, x0 = random_crop(rng, label, area, crop, cat_max_ratio, grid)
    if cls is None or wanted <= 0:
        return y0, x0
    for _ in range(CROP_TRIES):
        if (label[y0 : y0 + crop[0], x0 : x0 + crop[1]] == cls).sum() > wanted:
            break
        y0, x0 = random_crop(rng, label, area, crop, cat_max_ratio, grid)
    return y0, x0


def pick_draw(rng: np.random.Generator, draw_counts: np.ndarray, cls: int, wanted: float) -> int:
    """Which cached crop draw of an image a sample of class `cls` reads: uniformly among the
    draws holding more than `wanted` pixels of it (what DAFormer's re-crops end on), else any.

    `draw_counts` (K, classes) are the draws' pixel counts."""
    k = len(draw_counts)
    if wanted > 0:
        good = np.flatnonzero(draw_counts[:, cls] > wanted)
        if good.size:
            return int(good[rng.integers(good.size)])
    return int(rng.integers(k))
