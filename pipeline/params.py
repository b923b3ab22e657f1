"""Read one group of params.yaml into a dataclass (plain function calls, no config magic)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_params(path: str | os.PathLike[str] = "params.yaml") -> dict[str, Any]:
    """Load the whole params file as a dict."""
    with open(path) as f:
        return yaml.safe_load(f) or {}


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build dataclass `cls` from `values`, rejecting unknown keys so typos fail loudly."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {unknown} (known: {sorted(names)})")
    return cls(**values)


def project_root() -> Path:
    """The folder holding params.yaml: stages run from there under DVC."""
    return Path.cwd()
