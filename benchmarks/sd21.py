"""The SD-2.1-architecture folder of random weights the benchmarks and the rehearsal run on (the
architecture, not the weights, sets the cost): built once from pipeline/diffusion/sd21, fp16
safetensors, 2.5 GB, cached in .rehearsal/."""

from __future__ import annotations

from pathlib import Path

from pipeline.diffusion.build import build_sd21_model
from pipeline.diffusion.model import save_diffusion_model

WORK = Path(__file__).resolve().parents[1] / ".rehearsal"


def sd21_folder() -> Path:
    """The random-weight SD-2.1 folder, built on first use."""
    folder = WORK / "sd21-random"
    if not (folder / "model_index.json").is_file():
        save_diffusion_model(build_sd21_model(seed=0), folder)
    return folder
