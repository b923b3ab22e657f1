"""params.yaml, the one source of truth: load it and validate each group into its config dataclass.

Each stage reads the groups it needs with `read_group`, before any work starts. A group's
dataclass (declared with `@dataclass(config=STRICT)` next to the code it configures) has no
defaults: every value comes from params.yaml, and tests/test_params.py checks that the two
list the same keys. A bad value is one ConfigError line naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from pipeline.core.errors import ConfigError

T = TypeVar("T")

# Unknown keys are errors (a typo must not silently fall back to a default).
STRICT = ConfigDict(extra="forbid")
# Strict: 50.0 or true are refused, not coerced (DVC would name the stage extract@50.0 and
# write t50.0 while the readers open t50).
Timestep = Annotated[int, Field(ge=0, strict=True)]
Positive = Annotated[int, Field(ge=1)]
Resolution = Annotated[list[Positive], Field(min_length=2, max_length=2)]  # [height, width]


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (PyYAML keeps the last;
    DVC refuses the same file, so the stages, the plan and the recipes refuse it too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's floats: PyYAML (YAML 1.1) reads 6e-05 as a string, and DVC writes a float of an
# experiment's `-S` so.
_UniqueKeys.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)

# A recipe's `based_on` and a recipe's name: a file name beside it, never a path elsewhere.
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def load_params(
    path: str | os.PathLike[str] = "params.yaml", _chain: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """The whole params file as a dict; a recipe with `based_on: <file>` (a file beside it) is
    that recipe with this one's values applied over it."""
    try:
        with open(path) as f:
            params = yaml.load(f, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from e
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of params groups")
    base = params.pop("based_on", None)
    if base is not None:
        here = Path(path).resolve()
        if not isinstance(base, str) or not RECIPE_NAME.fullmatch(base) or ".." in base:
            raise ConfigError(f"{path}: based_on {base!r}: a file name beside it, not a path")
        base_path = Path(path).parent / base
        if base_path.resolve() in (*_chain, here):
            loop = " -> ".join(p.name for p in (*_chain, here, base_path.resolve()))
            raise ConfigError(f"{path}: based_on loops ({loop})")
        if not base_path.is_file():
            raise ConfigError(f"{path}: based_on {base}: no such recipe beside it")
        params = apply_recipe(load_params(base_path, (*_chain, here)), params)
    return params


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


# Stated whole by a recipe, never merged key by key.
RECIPE_WHOLE = {("data", "source"), ("data", "targets")}


def apply_recipe(base: dict[str, Any], recipe: dict[str, Any], path: tuple[str, ...] = ()) -> dict:
    """`base` with a recipe's values (a copy): nested groups key by key, data.source and
    data.targets whole (recipes/run.py, the plan and the rehearsal merge alike)."""
    out = copy.deepcopy(base)
    for key, value in recipe.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and here not in RECIPE_WHOLE:
            out[key] = apply_recipe(out[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_group(params: dict[str, Any], key: str, cls: type[T], source: str = "params.yaml") -> T:
    """Validate params[key] (a dotted key: "encode.resolution") into `cls`, a dataclass or type."""
    value: Any = params
    for i, part in enumerate(key.split(".")):
        if not isinstance(value, dict) or part not in value:
            missing = ".".join(key.split(".")[: i + 1])
            raise ConfigError(f"{source}: {missing}: missing (params.yaml must set it)")
        value = value[part]
    return validate(value, cls, key, source)


def validate(values: Any, cls: type[T], where: str, source: str = "params.yaml") -> T:
    """`values` validated as `cls` (a dataclass, or any type pydantic knows), or one ConfigError."""
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e, cls, where))) from None


def read_timesteps(params: dict[str, Any], source: str = "params.yaml") -> list[int]:
    """The top-level `timesteps` list: non-negative ints, at least one, no duplicates."""
    timesteps = read_group(params, "timesteps", list[Timestep], source)
    if not timesteps:
        raise ConfigError(f"{source}: timesteps: list at least one timestep")
    repeated = sorted({t for t in timesteps if timesteps.count(t) > 1})
    if repeated:
        raise ConfigError(f"{source}: timesteps: {repeated} listed more than once")
    return timesteps


def timestep_argument(text: str, params: dict[str, Any], source: str = "params.yaml") -> int:
    """A stage's `--timestep` (as dvc.yaml passes it): an integer written as such and listed in
    `timesteps`; anything else is one ConfigError."""
    timesteps = read_timesteps(params, source)
    if not re.fullmatch(r"0|[1-9][0-9]{0,8}", text) or int(text) not in timesteps:
        raise ConfigError(f"--timestep {text!r}: not one of {source}'s timesteps {timesteps}")
    return int(text)


def _describe(error: ValidationError, cls: type, where: str) -> list[str]:
    out = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join([where, *loc])
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            known = _field_names(cls, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            out.append(f"{key}: unknown key{hint}")
        elif e["type"] == "missing":
            out.append(f"{key}: missing (params.yaml must set it)")
        elif isinstance(e.get("input"), dict):  # a rule over a whole group: it names its keys
            out.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{key}: {msg} (got {e.get('input')!r})")
    return out


def _field_names(cls: type, path: list[str]) -> list[str]:
    # Walk nested dataclass annotations to name the keys known where an unknown one was found.
    current: Any = cls
    for part in path:
        if not dataclasses.is_dataclass(current):
            args = [a for a in typing.get_args(current) if dataclasses.is_dataclass(a)]
            current = args[0] if args else None
            if current is None:
                return []
            continue
        hints = typing.get_type_hints(current, include_extras=True)
        current = hints.get(part)
    if not dataclasses.is_dataclass(current):
        args = [a for a in typing.get_args(current) if dataclasses.is_dataclass(a)]
        current = args[0] if args else None
    return [f.name for f in dataclasses.fields(current)] if current is not None else []
