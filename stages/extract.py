"""DVC stage extract@<t>: UNet features of the encoded latents at one timestep -> data/features/t<t>/.

Runs alone or under torchrun (each rank writes its own shard-aligned part of the same store).
"""

from __future__ import annotations

import argparse
import os

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)
import torch.distributed as dist

from pipeline.diffusion import load_diffusion_model
from pipeline.encoded import PROMPTS_NAME, open_labels, open_latents, read_index, read_prompts
from pipeline.errors import StoreError, run_stage
from pipeline.extract import ExtractConfig, extract_store
from pipeline.params import from_dict, load_params
from pipeline.prompts import GUIDED_PROMPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--timestep", type=int, required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--encoded", default="data/encoded")
    ap.add_argument("--out", default=None, help="default data/features/t<timestep>")
    args = ap.parse_args()
    params = load_params(args.params)
    # The timestep list is DVC's foreach input, not this stage's: each stage reads only --timestep.
    cfg = from_dict(ExtractConfig, {k: v for k, v in params["extract"].items() if k != "timesteps"})
    model_params = params.get("model", {})
    device = str(model_params.get("device", "cpu"))
    dtype = str(model_params.get("dtype", "fp32"))
    out = args.out or f"data/features/t{args.timestep}"

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    barrier = None
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        barrier = dist.barrier

    model = load_diffusion_model(args.model, dtype=dtype, device=device)
    prompts, embeds, prompt_model = read_prompts(os.path.join(args.encoded, PROMPTS_NAME))
    if prompt_model != model.fingerprint:
        raise StoreError(
            f"{args.encoded}: prompts were encoded with model {prompt_model}, "
            f"not {model.fingerprint}; rerun encode"
        )
    result = extract_store(
        model,
        open_latents(args.encoded),
        read_index(args.encoded),
        prompts,
        embeds,
        args.timestep,
        out,
        cfg,
        compute_dtype=dtype,
        rank=rank,
        world_size=world_size,
        barrier=barrier or (lambda: None),
        progress=rank == 0,
        labels=open_labels(args.encoded) if GUIDED_PROMPT in prompts else None,
    )
    rate = result.images / result.seconds if result.seconds > 0 else 0.0
    print(
        f"rank {rank}: computed shards {result.computed_shards} "
        f"({result.images} images, {result.seconds:.2f} s, {rate:.1f} img/s) -> {out}",
        flush=True,
    )
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_stage("extract", main)
