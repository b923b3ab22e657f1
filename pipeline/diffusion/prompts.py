"""Prompt variants: the conditionings whose features the store caches (the V axis of each array).

Text variants are strings: the scene prompt (Gong et al.) with optional condition words, or the
empty prompt. Two placeholders stand for non-text conditionings that extract builds itself:
"<guided>" (DIFF: ground-truth regions conditioned on their class prompts) and "<category>"
(VPD: the 19 class-name embeddings as context). A name ending in "+category" appends those 19
class tokens to a text prompt's context (Gong et al.'s scene + averaged-EOS category prompts,
as TADP describes their model).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import field_validator, model_validator
from pydantic.dataclasses import dataclass

from pipeline.core.classes import CLASSES
from pipeline.core.names import (
    CATEGORY,
    CATEGORY_PROMPT,
    GUIDED,
    GUIDED_DIFF_PROMPT,
    GUIDED_PROMPT,
    PLAIN,
    SCENE,
)
from pipeline.core.params import STRICT

# Fixed by the code (a store records only "<guided>"/"<category>"), never by a param.
CLASS_TEMPLATE = "A high quality photo; europe city; {name}, {description}"
# Each class token is the mean end-of-text state over these templates ("averaged EOS").
CATEGORY_TEMPLATES = ("a photo of a {name}", "a {name} in a city street", "an image of a {name}")
WITH_CATEGORY = "<+category>"  # marks a text variant whose context also holds the class tokens

# DIFF's released class prompts (its label_map: only five classes carry one), by train id:
# mmseg/models/backbones/diff/configs/diff_config.yaml:62-81.
DIFF_CLASS_PROMPTS: dict[int, str] = {
    1: "A high quality photo; europe city; sidewalk, Paths for pedestrian use",
    3: "A high quality photo; europe city; wall, Outer walls of buildings or structures",
    12: "A high quality photo; europe city; rider, People riding bicycles, motorcycles",
    14: "A high quality photo; europe city; truck, Larger vehicles used for cargo transport",
    16: "A high quality photo; europe city; train, Vehicles on railway tracks",
}

# Short visual descriptions for DIFF's class prompts (one per Cityscapes train class, in order).
CLASS_DESCRIPTIONS: dict[str, str] = {
    "road": "flat asphalt surface where cars drive",
    "sidewalk": "paved path beside the road for pedestrians",
    "building": "facades of houses and offices with windows",
    "wall": "standalone wall of stone or concrete",
    "fence": "fence or railing made of metal or wood",
    "pole": "thin vertical pole for lamps or signs",
    "traffic light": "traffic signal with red, yellow and green lights",
    "traffic sign": "road sign board on a pole",
    "vegetation": "trees, bushes and hedges with green leaves",
    "terrain": "grass and soil on the ground",
    "sky": "open sky above the street",
    "person": "pedestrian walking or standing",
    "rider": "person riding a bicycle or motorcycle",
    "car": "passenger car on the road",
    "truck": "large truck for goods",
    "bus": "long public bus",
    "train": "tram or train on rails",
    "motorcycle": "motorbike with two wheels",
    "bicycle": "bicycle with two thin wheels",
}


@dataclass(config=STRICT)
class PromptConfig:
    """The `prompts` group: the scene prompt, condition words, and the variants in store order."""

    scene: str
    conditions: dict[str, str]  # variant name -> words appended to the scene prompt
    variants: list[str]  # plain | scene | guided | category | a condition name, [+category]
    guided: Literal["region", "diff"]  # region: one pass, regions attend to their class prompt
    # (all 19); diff: DIFF's passes per class prompt (its five) blended over the masks

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[str]) -> list[str]:
        if not variants:
            raise ValueError("list at least one variant (variant 0 is what evaluate scores)")
        repeated = sorted({v for v in variants if variants.count(v) > 1})
        if repeated:
            raise ValueError(f"variants {repeated} listed more than once")
        return variants

    @model_validator(mode="after")
    def _known(self) -> PromptConfig:
        variant_prompts(self)  # raises on an unknown name
        return self


def variant_prompts(cfg: PromptConfig) -> dict[str, str]:
    """Variant name -> prompt text in store order (placeholders for guided and category)."""
    out: dict[str, str] = {}
    for name in cfg.variants:
        base, plus, extra = name.partition("+")
        if plus:
            if extra != CATEGORY or base in (GUIDED, CATEGORY):
                raise ValueError(f"prompt variant {name!r}: only a text variant takes '+category'")
            out[name] = (
                variant_prompts(dataclasses.replace(cfg, variants=[base]))[base] + WITH_CATEGORY
            )
            continue
        if name == PLAIN:
            out[name] = ""
        elif name == SCENE:
            out[name] = cfg.scene
        elif name == GUIDED:
            out[name] = GUIDED_PROMPT if cfg.guided == "region" else GUIDED_DIFF_PROMPT
        elif name == CATEGORY:
            out[name] = CATEGORY_PROMPT
        elif name in cfg.conditions:
            out[name] = f"{cfg.scene} {cfg.conditions[name]}"
        else:
            known = [PLAIN, SCENE, GUIDED, CATEGORY, *cfg.conditions]
            raise ValueError(f"unknown prompt variant {name!r} (known: {known})")
    return out


def class_prompts() -> list[str]:
    """DIFF's 19 class prompts, in train-id order."""
    return [CLASS_TEMPLATE.format(name=n, description=CLASS_DESCRIPTIONS[n]) for n in CLASSES]


def category_prompts() -> list[list[str]]:
    """Per class (train-id order) its name in each category template."""
    return [[t.format(name=n) for t in CATEGORY_TEMPLATES] for n in CLASSES]


def text_of(prompt: str) -> tuple[str, bool]:
    """(the text to encode, whether the class tokens are appended) of a stored variant text."""
    if prompt.endswith(WITH_CATEGORY):
        return prompt.removesuffix(WITH_CATEGORY), True
    return prompt, False
