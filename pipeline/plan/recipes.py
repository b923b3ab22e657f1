"""A recipe (recipes/<name>.yaml: a partial params file over params.yaml) as a DVC experiment:
its values as `dvc exp run -S` overrides, so that the experiment's params.yaml is DVC's and the
workspace's is never written by this project (recipes/run.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.core.params import RECIPE_WHOLE


def absolute_roots(params: dict, root: Path) -> dict:
    """Relative roots of real datasets and an external model folder made absolute from the
    project `root` (the experiment runs in a temporary copy of the repository, where
    data/external is not)."""
    out = copy.deepcopy(params)
    data = out.get("data", {})
    entries = [data.get("source", {}), *data.get("targets", {}).values()]
    for entry in entries:
        if entry.get("kind") != "synthetic" and "root" in entry:
            entry["root"] = str((root / entry["root"]).resolve())
    model = out.get("model", {})
    if model.get("source", "build") != "build":
        model["source"] = str((root / model["source"]).resolve())
    return out


def hydra_value(value: Any) -> str:
    """A params value in the override grammar `dvc exp run -S` reads (Hydra's): strings
    quoted, lists and mappings in flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):  # Hydra reads 6e-05 as a string: its floats have a point
        mantissa, e, exponent = repr(value).partition("e")
        return mantissa + ("" if "." in mantissa else ".0") + e + exponent
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(map(hydra_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"params value {value!r}: not a YAML scalar, list or mapping")


def overrides(base: dict, merged: dict, path: tuple[str, ...] = ()) -> list[str]:
    """The `dvc exp run -S` overrides that turn `base` into `merged`: a changed leaf `key=value`;
    a group stated whole (RECIPE_WHOLE), or a value of another shape, `~key` then `+key=value`
    (DVC's params are strict: a mapping cannot gain keys by assignment); a new key `+key=`."""
    out = []
    for key, value in merged.items():
        here = (*path, key)
        name = ".".join(here)
        old = base.get(key)
        if key not in base:
            out.append(f"+{name}={hydra_value(value)}")
        elif isinstance(value, dict) and isinstance(old, dict) and here not in RECIPE_WHOLE:
            out += overrides(old, value, here)
        elif value != old or type(value) is not type(old):
            if isinstance(value, dict) or isinstance(old, dict):
                out += [f"~{name}", f"+{name}={hydra_value(value)}"]
            else:
                out.append(f"{name}={hydra_value(value)}")
    return out
