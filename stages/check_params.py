"""DVC stage check_params: every params group validated, and what only a later stage could
refuse checked now, before DVC removes anything downstream (every stage depends on this one).

Per group its dataclass (one line naming the key on a bad value); across groups: the timestep
list, crop draws against feature-space crops, the devices and precisions this machine has,
train.processes against train.batch_size, the inversion schedule against the timesteps.
Writes `out`, whose content never changes: valid params re-run nothing downstream.
"""

from pathlib import Path

from _stage import parse

from pipeline.cache.preload import LoaderConfig
from pipeline.core.device import check_device
from pipeline.core.errors import ConfigError, PipelineError, run_stage
from pipeline.core.fileio import atomic_path
from pipeline.core.params import read_group, read_timesteps
from pipeline.data.datasets import DataConfig
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.prompts import PromptConfig
from pipeline.loops import encode, evaluate, extract, invert, pretrain, train, tune

GROUPS = {
    "data": DataConfig,
    "model": ModelConfig,
    "pretrain": pretrain.PretrainConfig,
    "encode": encode.EncodeConfig,
    "extract": extract.ExtractConfig,
    "invert": invert.InvertConfig,
    "train": train.TrainConfig,
    "loader": LoaderConfig,
    "evaluate": evaluate.EvalConfig,
    "tune_prompt": tune.TuneConfig,
    "prompts": PromptConfig,
}


def check_all(params: dict, source: str = "params.yaml") -> None:
    """Every check above; what fails is one ConfigError line listing each problem. Real
    datasets' roots and an external model folder must exist (synthetic data is generated)."""
    cfg = {name: read_group(params, name, cls, source) for name, cls in GROUPS.items()}
    read_group(params, "seed", int, source)
    timesteps = read_timesteps(params, source)
    problems = []

    def check(fn, *args) -> None:
        try:
            fn(*args)
        except PipelineError as e:
            problems.append(str(e))

    check(encode.check_crop, cfg["encode"], cfg["train"].crop)
    check(check_device, cfg["model"].device, "model.device", cfg["model"].dtype)
    check(check_device, cfg["train"].device, "train.device", cfg["train"].precision)
    check(check_device, cfg["evaluate"].device, "evaluate.device")
    if cfg["extract"].noise_mode == "trajectory":
        steps = cfg["invert"].inversion().unet_timesteps()
        off = [t for t in timesteps if t not in steps]
        if off:
            problems.append(
                f"timesteps {off}: not on the inversion schedule (extract.noise_mode "
                f"trajectory); its UNet passes run at {steps}"
            )
    names = list(cfg["prompts"].variants)
    unknown = [v for v in cfg["train"].train_variants if v not in names]
    if unknown:
        problems.append(f"train.train_variants {unknown}: not in prompts.variants {names}")
    if cfg["train"].guided_weight > 0 and "guided" not in names:
        problems.append("train.guided_weight > 0 needs the `guided` variant in prompts.variants")
    data = cfg["data"]
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
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def main() -> None:
    args, params = parse(__doc__, "out")
    check_all(params, args.params)
    with atomic_path(args.out) as tmp:
        tmp.write_text("params.yaml checked\n")


if __name__ == "__main__":
    run_stage("check_params", main)
