"""Each kind (fusion, head, dataset layout, tap preset, storage mode) is declared once, in a table
of its own layer: params accept exactly the table's keys (their check is derived from it), the
builders build every key, and params.yaml's comment names every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import PARAMS, config, fusion_config, head_config, tiny_model

from pipeline.cache.storage import MODES, parse_storage
from pipeline.core.errors import ConfigError
from pipeline.core.params import validate
from pipeline.data.datasets import DatasetEntry
from pipeline.data.layouts import LAYOUTS, label_table
from pipeline.diffusion.taps import PRESETS, preset_paths
from pipeline.heads.decoders import HEADS, build_head
from pipeline.heads.fusion import FUSIONS
from pipeline.heads.seg_model import build_fusion
from pipeline.loops.extract import ExtractConfig
from pipeline.loops.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"t50/a": [8, 8], "t50/b": [8, 16], "t50/c": [8, 32]}


def _comment(key: str) -> str:
    """params.yaml's comment on `group.key` (with its continuation lines)."""
    group, name = key.split(".")
    text = (ROOT / "params.yaml").read_text()
    block = re.search(rf"^{group}:\n((?:[ #].*\n)+)", text, re.M).group(1)
    lines = block.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"  {name}:", ln))
    out = [lines[start]]
    for line in lines[start + 1 :]:
        if not re.match(r"^\s{6,}#", line):
            break
        out.append(line)
    return " ".join(out)


@pytest.mark.parametrize(
    ("key", "table", "builds"),
    [
        ("train.fusion", FUSIONS, "fusion"),
        ("train.head", HEADS, "head"),
        ("extract.taps", PRESETS, "taps"),
        ("extract.storage", MODES, "storage"),
    ],
)
def test_params_accept_exactly_the_table_and_name_it(key, table, builds) -> None:
    group, name = key.split(".")
    cls = {"train": TrainConfig, "extract": ExtractConfig}[group]
    written = {k: k.replace("<k>", "8") for k in table}  # a pattern's parameter filled in
    for kind in table:
        assert getattr(config(group, cls, **{name: written[kind]}), name) == written[kind]
    with pytest.raises(ConfigError, match=rf"{key}: ") as err:
        config(group, cls, **{name: "no-such-kind"})
    for kind in table:  # the refusal lists the table
        assert kind in str(err.value) and kind in _comment(key), (key, kind)


def test_every_fusion_and_head_builds_and_runs() -> None:
    x = {k: torch.randn(1, c, 64 // s, 64 // s) for k, (c, s) in INPUTS.items()}
    for kind in FUSIONS:
        fusion = build_fusion(fusion_config(kind=kind, inputs=INPUTS))
        maps = fusion(x)
        assert [m.shape[1] for m in maps] == [c for c, _ in fusion.out_specs]
        for head in HEADS:
            logits = build_head(fusion.out_specs, head_config(kind=head))(maps)
            assert logits.shape[:2] == (1, 19)


def test_every_tap_preset_names_modules_of_the_unet() -> None:
    unet = tiny_model().unet
    modules = dict(unet.named_modules())
    for preset in PRESETS:
        paths = preset_paths(unet, preset)
        assert paths and set(paths.values()) <= set(modules), preset


def test_every_storage_mode_parses_and_says_how_to_decode() -> None:
    for pattern in MODES:
        mode = parse_storage(pattern.replace("<k>", "8"))
        assert mode.name == pattern.replace("<k>", "8") and "values" in mode.decode
        assert mode.stored_channels(32) == (8 if "<k>" in pattern else 32)


def test_every_dataset_layout_is_a_kind_with_a_label_table() -> None:
    root = PARAMS["data"]["source"]["root"]
    for kind in LAYOUTS:
        extra = {"condition": "fog"} if kind == "acdc" else {}
        entry = validate({"kind": kind, "root": root, "split": "val", **extra}, DatasetEntry, "e")
        assert entry.kind == kind
        assert label_table(kind).lut.dtype == "uint8"
        kinds_line = re.search(r"# kind \((.*)\)", (ROOT / "params.yaml").read_text()).group(1)
        assert kind in kinds_line.split(" | "), kind
    with pytest.raises(ConfigError, match="e.kind: Input should be 'synthetic', 'gta5'"):
        validate({"kind": "kitti", "root": root, "split": "val"}, DatasetEntry, "e")
