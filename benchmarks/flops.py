"""FLOPs of online vs cached training, and the cost of caching GTA5, from the architectures.

No GPU was lent to the sessions so far, so the SD-2.1 figures of issue 7 are estimated from
counted FLOPs (torch's FlopCounterMode on the meta device: no weights, no download), for the
default small model at 128x256 and the SD-2.1 config (pipeline/diffusion/sd21) at 1024x512 with
the DIFF recipe's head widths. Online iteration = VAE encode + one UNet pass per timestep +
head forward/backward (~3x forward); cached = the head step alone. The GPU-hours row assumes
a utilization, it does not measure one.

Usage: python benchmarks/flops.py [--timesteps 2] [--gta5-timesteps 5] [--utilization 0.4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

from pipeline.core.names import FeatureKey
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import SD21_CONFIGS, SmallModelConfig, build_small_model, sd21_unet
from pipeline.diffusion.taps import resolve_taps
from pipeline.loops.train import TrainConfig, build_model
from pipeline.reporting.machine import Run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "flops.json"
PARAMS = load_params(ROOT / "params.yaml")
H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA H100 SXM datasheet, dense (no sparsity)
GTA5_IMAGES = 24966


def count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def costs(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_dim: int,
    hw: tuple[int, int],
    timesteps: int,
    train_cfg: TrainConfig,
) -> dict[str, float]:
    """GFLOPs per image: VAE encode, one UNet pass, head forward; and the iteration ratio."""
    h, w = hw
    taps = resolve_taps(unet, "diff", 8)
    # Inputs (and the head) live where the model does: meta for SD-2.1, cpu for the small one.
    with torch.device(next(unet.parameters()).device), torch.no_grad():
        x = torch.zeros(1, 3, h, w)
        lat = torch.zeros(1, unet.config.in_channels, h // 8, w // 8)
        ctx = torch.zeros(1, 77, text_dim)
        t = torch.tensor([50])
        specs = {
            str(FeatureKey(50 + 100 * k, tap.name)): (tap.channels, tap.stride)
            for k in range(timesteps)
            for tap in taps
        }
        head = build_model(train_cfg, specs)
        feats = {key: torch.zeros(1, c, h // s, w // s) for key, (c, s) in specs.items()}
        vae_f = count(lambda: vae.encode(x))
        unet_f = count(lambda: unet(lat, t, ctx))
        head_f = count(lambda: head(feats))
    online = vae_f + timesteps * unet_f + 3 * head_f
    return {
        "vae_encode_gflop": vae_f / 1e9,
        "unet_pass_gflop": unet_f / 1e9,
        "head_forward_gflop": head_f / 1e9,
        "online_over_cached_iteration": online / (3 * head_f),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timesteps", type=int, default=2, help="timesteps the head trains on")
    ap.add_argument("--gta5-timesteps", type=int, default=5)
    ap.add_argument("--utilization", type=float, default=0.4, help="assumed share of peak")
    args = ap.parse_args()
    run = Run()

    small = build_small_model(read_group(PARAMS, "model.small", SmallModelConfig), seed=0)
    train_cfg = read_group(PARAMS, "train", TrainConfig)
    default = costs(
        small.unet,
        small.vae,
        small.text_encoder.config.hidden_size,
        (128, 256),
        args.timesteps,
        train_cfg,
    )
    unet = sd21_unet("meta")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD21_CONFIGS / "vae"))
    # DIFF's recipe: fused widths 256..2048, DAFormer embedding 256.
    recipe = dataclasses.replace(
        train_cfg, widths=[256, 512, 1024, 2048], embed_dim=256, hyper_channels=384
    )
    sd21 = costs(unet, vae, unet.config.cross_attention_dim, (512, 1024), args.timesteps, recipe)
    # Caching GTA5 at 1024x512: one VAE encode per image, one UNet pass per timestep.
    flop = GTA5_IMAGES * (sd21["vae_encode_gflop"] + args.gta5_timesteps * sd21["unet_pass_gflop"])
    gpu_hours = flop * 1e9 / (H100_BF16_DENSE_TFLOPS * 1e12 * args.utilization) / 3600
    # What the writer must sustain to keep up with that GPU, per storage mode (stored bytes).
    taps = resolve_taps(unet, "diff", 8)
    pixels = [(t.channels, (512 // t.stride) * (1024 // t.stride)) for t in taps]
    per_image_t = {
        "fp16": sum(2 * c * n for c, n in pixels),
        "int8": sum(c * n + 4 * c for c, n in pixels),
        "pca-64": sum(2 * 64 * n for _, n in pixels),
    }
    stores = GTA5_IMAGES * args.gta5_timesteps
    out = {
        "settings": vars(args),
        "default_small_128x256": default,
        "sd21_1024x512_diff_recipe": sd21,
        "gta5_cache_estimate": {
            "images": GTA5_IMAGES,
            "timesteps": args.gta5_timesteps,
            "pflop": flop / 1e6,
            "h100_bf16_peak_tflops": H100_BF16_DENSE_TFLOPS,
            "assumed_utilization": args.utilization,
            "h100_hours": gpu_hours,
            "terabytes": {k: stores * b / 1e12 for k, b in per_image_t.items()},
            "write_GB_per_s_to_keep_up": {
                k: stores * b / (gpu_hours * 3600) / 1e9 for k, b in per_image_t.items()
            },
        },
    }
    run.write(RESULTS, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
