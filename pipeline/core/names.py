"""What the layers call things: feature keys (timestep, tap) and prompt-variant names."""

from __future__ import annotations

import dataclasses
import re

from pipeline.core.errors import ModelError

_TEXT = re.compile(r"^t(\d+)/([^/]+)$")


@dataclasses.dataclass(frozen=True, order=True)
class FeatureKey:
    """The map of tap `tap` at timestep `timestep`; str() is its JSON and dict-key form "t50/up1_res0"."""

    timestep: int
    tap: str

    def __str__(self) -> str:
        return f"t{self.timestep}/{self.tap}"

    @classmethod
    def parse(cls, text: str) -> FeatureKey:
        """The inverse of str(); a malformed key is a ModelError naming it."""
        m = _TEXT.match(text)
        if m is None:
            raise ModelError(f"feature key {text!r} is not of the form 't<timestep>/<tap>'")
        return cls(int(m.group(1)), m.group(2))


# Prompt-variant names (prompts.variants) and the placeholder texts a store's identity records
# for the two variants that are not text prompts.
PLAIN, SCENE, GUIDED, CATEGORY = "plain", "scene", "guided", "category"
GUIDED_PROMPT = "<guided>"  # one pass: each ground-truth region attends to its class prompt
GUIDED_DIFF_PROMPT = "<guided-diff>"  # DIFF: a pass per class prompt, blended over the masks
CATEGORY_PROMPT = "<category>"  # VPD: the 19 class-name embeddings as context
