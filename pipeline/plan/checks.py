"""The params checks check_params runs (and recipes/run.py before DVC touches anything): every
params group validated, and what only a later stage could refuse checked now, before DVC removes
anything downstream (every stage depends on check_params).

Per group its dataclass (one line naming the key on a bad value); across groups: where prepare
writes, the timestep list, crop draws against feature-space crops, the devices and precisions
this machine has, train.processes against train.batch_size, the inversion schedule against the
timesteps; what the model's architecture decides (timestep range, taps, storage widths,
sizes against the UNet's grid, feature-space crops against the coarsest stride); and that the
outputs fit the free disk (pipeline/plan: the same budget `python -m pipeline.plan` prints).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.preload import LoaderConfig
from pipeline.cache.storage import parse_storage
from pipeline.core.device import check_device
from pipeline.core.errors import ConfigError, PipelineError
from pipeline.core.params import read_group, read_timesteps
from pipeline.data.datasets import DATASETS_DIR, DataConfig, check_destinations
from pipeline.data.sampling import SamplingConfig
from pipeline.diffusion.build import ModelConfig, model_architecture
from pipeline.diffusion.model import DiffusionModel, check_unet_file
from pipeline.diffusion.prompts import PromptConfig, variant_prompts
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.text import check_prompt_lengths
from pipeline.extraction.noise import noise_mode
from pipeline.loops import (
    cleandift,
    encode,
    evaluate,
    extract,
    invert,
    pretrain,
    train,
    tune_prompt,
)
from pipeline.plan.budget import plan

GROUPS = {
    "data": DataConfig,
    "model": ModelConfig,
    "pretrain": pretrain.PretrainConfig,
    "encode": encode.EncodeConfig,
    "extract": extract.ExtractConfig,
    "invert": invert.InvertConfig,
    "cleandift": cleandift.CleanDiftConfig,
    "sampling": SamplingConfig,
    "train": train.TrainConfig,
    "loader": LoaderConfig,
    "evaluate": evaluate.EvalConfig,
    "tune_prompt": tune_prompt.TuneConfig,
    "prompts": PromptConfig,
}


def check_all(params: dict, source: str = "params.yaml") -> None:
    """Every check above; what fails is one ConfigError line listing each problem. Real
    datasets' roots and an external model folder must exist (synthetic data is generated).

    Each check across groups is the very function the stage that would refuse it calls
    (tests/test_check_params.py finds every such rule in pipeline/ and runs it here)."""
    cfg = {name: read_group(params, name, cls, source) for name, cls in GROUPS.items()}
    read_group(params, "seed", int, source)
    timesteps = read_timesteps(params, source)
    problems = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except PipelineError as e:
            problems.append(str(e))

    data, enc, ext, tr = cfg["data"], cfg["encode"], cfg["extract"], cfg["train"]
    check(check_destinations, data, DATASETS_DIR)  # prepare
    check(encode.check_crop, enc, cfg["sampling"].feature_crop)
    check(train.check_pixel_input, tr, enc.crop is not None)
    check(check_device, cfg["model"].device, "model.device", cfg["model"].dtype)
    check(check_device, tr.device, "train.device", tr.precision)
    check(check_device, cfg["evaluate"].device, "evaluate.device")
    check(cleandift.check_unet_source, cfg["model"].unet, cfg["cleandift"].steps)
    schedule = cfg["invert"].inversion().unet_timesteps()
    check(noise_mode(ext.noise_mode).check_timesteps, timesteps, schedule)
    names = list(cfg["prompts"].variants)
    unknown = [v for v in tr.train_variants if v not in names]
    if unknown:
        problems.append(f"train.train_variants {unknown}: not in prompts.variants {names}")
    if tr.guided_weight > 0 and "guided" not in names:
        problems.append("train.guided_weight > 0 needs the `guided` variant in prompts.variants")
    entries = {f"data.source ({data.source_name})": data.source}
    entries |= {f"data.targets.{k}": v for k, v in data.targets.items()}
    missing = [
        f"{where} root {e.root}"
        for where, e in entries.items()
        if e.kind != "synthetic" and not Path(e.root).is_dir()
    ]
    if cfg["model"].source != "build" and not Path(cfg["model"].source).is_dir():
        missing.append(f"model.source {cfg['model'].source}")
    if missing:
        problems.append(f"not found: {', '.join(missing)}")
    else:
        try:  # built once, weightless: the model rules and the budget read it
            model = model_architecture(cfg["model"], params.get("seed", 0))
        except PipelineError as e:
            problems.append(str(e))
        else:
            ruled = len(problems)
            check(check_model_rules, cfg, timesteps, model)
            unet = cfg["model"].unet
            if unet is not None and unet != cleandift.CLEANDIFT_UNET and Path(unet).exists():
                check(check_unet_file, Path(unet), model.unet)
            check(check_prompt_lengths, model.tokenizer, variant_prompts(cfg["prompts"]))
            if len(problems) == ruled:  # the budget needs the taps the rules accepted
                check(check_disk, params, source, model)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def check_model_rules(cfg: dict, timesteps: list[int], model: DiffusionModel) -> None:
    """What the model's architecture decides (its weights not loaded): the timestep range,
    the taps and their widths and strides, the sizes the UNet sees."""
    enc, ext, tr = cfg["encode"], cfg["extract"], cfg["train"]
    for t in timesteps:
        extract.check_timestep(model, t)
    taps = resolve_taps(model.unet, ext.taps, model.vae_stride)
    parse_storage(ext.storage).check_widths({t.name: t.channels for t in taps})
    encode.check_sizes(enc, cfg["data"], model.pixel_multiple)
    if tr.features == "diffusion":
        train.check_crop_stride(cfg["sampling"], max(t.stride for t in taps))


def check_disk(params: dict, source: str, model: DiffusionModel) -> None:
    """The run's outputs (and DVC's copies of them) fit the free disk (pipeline/plan)."""
    plan(params, source=source, model=model, count_flops=False).check_fits()
