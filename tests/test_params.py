"""params.yaml is the one source of truth: every key is read by a stage, every config field is a
key, no dataclass hides a default; and every bad value is one line naming the key."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import typing
from pathlib import Path

import pytest
from helpers import PARAMS, config, params

from pipeline.core.errors import ConfigError
from pipeline.core.params import read_group, read_timesteps
from pipeline.data.sampling import SamplingConfig
from pipeline.diffusion.build import ModelConfig
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def stage_reads() -> dict[str, object]:
    """{params key: the type its stage validates it as}, from the stage scripts' own calls."""
    reads: dict[str, object] = {}
    for script in sorted((ROOT / "stages").glob("[!_]*.py")):
        module = importlib.import_module(script.stem)
        for node in ast.walk(ast.parse(script.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            if node.func.id == "read_group" and isinstance(node.args[1], ast.Constant):
                key = node.args[1].value
                reads[key] = eval(ast.unparse(node.args[2]), vars(module))  # noqa: S307
            elif node.func.id == "read_timesteps":
                reads["timesteps"] = list
    return reads


def _mismatches(values: object, cls: object, where: str) -> list[str]:
    if not dataclasses.is_dataclass(cls):
        return []
    out = []
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    keys = set(values) if isinstance(values, dict) else set()
    for name in sorted(keys - set(fields)):
        out.append(f"{where}.{name}: in params.yaml, read by no config")
    for name, f in fields.items():
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        if has_default and f.default is not None:
            out.append(f"{where}.{name}: a default in code ({f.default!r}), not in params.yaml")
        if name not in keys:
            if not has_default:
                out.append(f"{where}.{name}: a knob in code that params.yaml lacks")
            continue
        hint = hints[name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint):
            out += _mismatches(values[name], hint, f"{where}.{name}")
        elif typing.get_origin(hint) is dict and inner:
            for k, v in values[name].items():
                out += _mismatches(v, inner[0], f"{where}.{name}.{k}")
    return out


def test_every_key_is_read_and_every_field_is_a_key() -> None:
    """Optional keys of a dataset entry (None: unset) are the one exception, listed in params.yaml."""
    reads = stage_reads()
    top = {key.split(".")[0] for key in reads}
    assert set(PARAMS) == top, (
        f"read by no stage: {set(PARAMS) - top}; missing: {top - set(PARAMS)}"
    )
    wrong = []
    for key, cls in reads.items():
        value = PARAMS
        for part in key.split("."):
            value = value[part]
        wrong += _mismatches(value, cls, key)
    assert not wrong, wrong


def test_every_group_of_the_default_is_valid() -> None:
    for key, cls in stage_reads().items():
        if key == "timesteps":
            assert read_timesteps(PARAMS) == PARAMS["timesteps"]
        else:
            read_group(PARAMS, key, cls)


@pytest.mark.parametrize(
    "group,over,message",
    [
        (
            "train",
            {"iterations": "many"},
            r"train.iterations: Input should be a valid integer.*'many'",
        ),
        ("train", {"iteratons": 5}, r"train.iteratons: unknown key; did you mean 'iterations'\?"),
        (
            "sampling",
            {"feature_crop": [64]},
            r"sampling.feature_crop: List should have at least 2 items",
        ),
        (
            "extract",
            {"noise_mode": "bogus"},
            r"extract.noise_mode: unknown noise mode 'bogus': expected one of \['add', 'trajectory', "
            r"'clean'\] \(got 'bogus'\)",
        ),
        (
            "extract",
            {"batch_size": 0},
            r"extract.batch_size: Input should be greater than or equal to 1",
        ),
        (
            "extract",
            {"storage": "pca-0"},
            r"extract.storage: unknown storage mode 'pca-0': expected one of \['fp16', 'int8', 'pca-<k>'",
        ),
        ("extract", {"taps": "difff"}, r"extract.taps: a preset in \['diff'"),
        ("model", {"dtype": "fp16"}, r"model: dtype fp16 on the CPU"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(group: str, over: dict, message: str) -> None:
    cls = {
        "train": TrainConfig,
        "sampling": SamplingConfig,
        "extract": ExtractConfig,
        "model": ModelConfig,
    }[group]
    with pytest.raises(ConfigError, match=message) as err:
        config(group, cls, **over)
    assert "\n" not in str(err.value) and str(err.value).startswith("params.yaml: ")


def test_timesteps_list_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"timesteps: \[50\] listed more than once"):
        read_timesteps(params(timesteps=[50, 150, 50]))
    with pytest.raises(
        ConfigError, match=r"timesteps.0: Input should be greater than or equal to 0"
    ):
        read_timesteps(params(timesteps=[-5]))
    with pytest.raises(ConfigError, match="timesteps: list at least one"):
        read_timesteps(params(timesteps=[]))
    with pytest.raises(ConfigError, match="missing group|timesteps: missing"):
        read_timesteps({k: v for k, v in PARAMS.items() if k != "timesteps"})
