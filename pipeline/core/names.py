"""What the layers call things: feature keys (timestep, tap), prompt-variant names, and the
plain names that become folder and file names (domains, sets)."""

from __future__ import annotations

import dataclasses
import re

from pipeline.core.errors import ModelError

_TEXT = re.compile(r"^t(\d+)/([^/]+)$")
# A domain's name becomes a folder (data/datasets/<name>, a store per set) and a file
# (manifests/<name>.parquet): no separator, no dot (no "..", no hidden file), no space.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def plain_name_problem(name: object) -> str | None:
    """Why `name` cannot name a folder or file here, or None when it is a plain name."""
    if isinstance(name, str) and PLAIN_NAME.fullmatch(name):
        return None
    return (
        f"{name!r} is not a plain name (1-64 letters, digits, '_' or '-', starting with a letter "
        "or digit): it names folders and files"
    )


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
