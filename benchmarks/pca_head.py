"""The head's training step on a PCA store: the coefficients fed to the fusion's first 1x1 maps
(what train does: no full-width reconstruction anywhere) against reconstructing every tap's full
width first (components^T z + mean) and training the full-width head on that, side by side.

DIFF's recipe head (its fusion, finecoder and DAFormer head at the recipe's widths; the
finecoder's 18 taps at 9 timesteps), batch 1, AdamW, gradients clipped at 5, on a crop draw of
--res at SD-2.1's tap widths (320-1280 channels), k = 64 components per tap. The arms take
turns, ROUNDS rounds of ITERATIONS steps; median and min-max ms per step. The script's own
check (exit 1, nothing written): the reconstructed inputs have the taps' full widths and equal
components^T z + mean.

Usage: python benchmarks/pca_head.py [--res 64 64] [--k 64] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
import yaml
from cost import Head, interleaved  # this script's folder is on sys.path

from pipeline.core.names import FeatureKey
from pipeline.core.params import load_params, read_group
from pipeline.diffusion.build import sd21_unet
from pipeline.diffusion.taps import resolve_taps
from pipeline.loops.train import TrainConfig, diff_inputs
from pipeline.reporting.machine import ROOT, Run

RESULTS = ROOT / "benchmarks" / "results" / "pca_head.json"
RECIPE = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())
ROUNDS, ITERATIONS = 5, 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs=2, default=[64, 64], help="crop (H, W)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    run = Run()
    torch.set_num_threads(args.threads)
    hw = tuple(args.res)
    params = load_params(ROOT / "params.yaml")
    cfg = read_group(
        {**params, "train": {**params["train"], **RECIPE["train"]}}, "train", TrainConfig
    )
    taps = resolve_taps(sd21_unet("meta"), "diff", 8)
    full = {
        str(FeatureKey(t, tp.name)): (tp.channels, tp.stride)
        for t in RECIPE["timesteps"]
        for tp in taps
    }
    full = diff_inputs(cfg, full)  # the finecoder's keys: strides 8-32
    gen = torch.Generator().manual_seed(0)
    basis, coefficients = {}, {}
    for key, (c, stride) in full.items():
        q, _ = torch.linalg.qr(torch.randn(c, args.k, generator=gen))
        basis[key] = (
            q.T.contiguous().to(args.device),
            torch.randn(c, generator=gen).to(args.device),
        )
        shape = (1, args.k, hw[0] // stride, hw[1] // stride)
        coefficients[key] = torch.randn(shape, generator=gen).to(args.device)

    def reconstruct() -> dict[str, torch.Tensor]:
        return {
            k: torch.einsum("kc,bkhw->bchw", basis[k][0], z) + basis[k][1][None, :, None, None]
            for k, z in coefficients.items()
        }

    wide = reconstruct()
    key = next(iter(full))
    run.check(
        all(wide[k].shape[1] == full[k][0] for k in full)
        and torch.allclose(
            wide[key][0, :, 0, 0],
            basis[key][0].T @ coefficients[key][0, :, 0, 0] + basis[key][1],
            atol=1e-4,
        ),
        "reconstruction is not components^T z + mean at full width",
    )
    heads = {
        "coefficients": Head(cfg, {k: (args.k, s) for k, (_, s) in full.items()}, hw, args.device),
        "reconstructed": Head(cfg, full, hw, args.device),
    }
    steps = {
        "coefficients": lambda: heads["coefficients"].step([coefficients]),
        "reconstructed": lambda: heads["reconstructed"].step([reconstruct()]),
    }
    for fn in steps.values():
        fn()  # warm-up
    timed = interleaved(steps, ROUNDS, ITERATIONS, args.device)  # seconds per step
    out = {
        name: {
            "median_ms": round(t["median_s"] * 1e3, 1),
            "min_ms": round(t["min_s"] * 1e3, 1),
            "max_ms": round(t["max_s"] * 1e3, 1),
            "rounds_ms": [round(x * 1e3, 1) for x in t["rounds_s"]],
            "input_channels": sum(
                (args.k if name == "coefficients" else c) for c, _ in full.values()
            ),
        }
        for name, t in timed.items()
    }
    out["reconstructed_over_coefficients"] = round(
        out["reconstructed"]["median_ms"] / out["coefficients"]["median_ms"], 2
    )
    run.write(
        RESULTS,
        {"settings": {**vars(args), "rounds": ROUNDS, "iterations": ITERATIONS}, "head_step": out},
    )
    print(out)


if __name__ == "__main__":
    main()
