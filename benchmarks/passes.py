"""Extraction seconds per crop draw of DIFF's recipe, before and after the pass cuts, side by
side on the SD-2.1 architecture (random weights: the architecture sets the cost).

One draw, as the invert and extract stages compute it: the plain and the guided DDIM inversion
on DIFF's 37-step schedule (the guided one with two class prompts over their masks), then the
tapped passes at DIFF's nine timesteps of both views. "before" is the code as it was (kept
here, transcribed, to time against): every step's pass including the last, the guided path's
"" prompt run a second time, one image per guided call. "after" is the library's: the
inversion ends at invert.last_timestep (91), "" runs once. The arms take turns, ROUNDS each;
median and min-max seconds per draw. The script's own checks (exit 1, nothing written): the
counted UNet passes are 221 and 168 per draw, and every latent the stores read (steps 0..33)
is the same in both arms (within fp32 batch-composition rounding).

Usage: python benchmarks/passes.py [--res 64 64] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import yaml
from cost import SD21, Counter, recipe_inversion, sync  # this script's folder is on sys.path

from pipeline.cache.storage import parse_storage
from pipeline.core.names import GUIDED_DIFF_PROMPT
from pipeline.diffusion.build import random_sd21_folder
from pipeline.diffusion.inversion import (
    Inversion,
    _eta,
    ddim_update,
    invert,
    invert_guided,
    region_masks,
)
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.taps import resolve_taps
from pipeline.diffusion.unet_features import prompt_contexts
from pipeline.extraction.noise import noise_mode
from pipeline.extraction.recipe import FeatureRecipe, tap_maps
from pipeline.reporting.machine import ROOT, Run

RESULTS = ROOT / "benchmarks" / "results" / "passes.json"
RECIPE = yaml.safe_load((ROOT / "recipes" / "diff-gta2cs.yaml").read_text())
SIDEWALK, RIDER = 1, 12


@torch.no_grad()
def invert_before(model: DiffusionModel, x0, inv: Inversion, contexts, noise) -> torch.Tensor:
    """The plain trajectory as the code ran it before: a pass at every step, the last too."""
    xs, x = [], x0.float()
    for i, (t, t_next) in enumerate(inv.steps):
        xs.append(x)
        out = model.unet(x, torch.tensor([t] * len(x)), contexts.plain.expand(len(x), -1, -1))
        x = ddim_update(
            model, x, out.sample.float(), t, t_next, _eta(inv, t), noise(i, 0), inv.prediction
        )
    return torch.stack(xs)


@torch.no_grad()
def invert_guided_before(model, x0, inv: Inversion, uncond, prompts, noise) -> torch.Tensor:
    """The guided trajectory of one image as the code ran it before: "" (the negative prompt)
    and every prompt in one call, the plain prompt "" among them, at every step."""
    masks = torch.cat([m.float() for _, m in prompts])
    count = masks.sum(dim=0, keepdim=True)
    contexts = torch.cat([uncond, *(c for c, _ in prompts)])
    xs, x = [], x0.float()
    for i, (t, t_next) in enumerate(inv.steps):
        xs.append(x)
        outs = model.unet(
            x.repeat(len(contexts), 1, 1, 1), torch.tensor([t] * len(contexts)), contexts
        ).sample.float()
        value = torch.zeros_like(x)
        for p in range(len(prompts)):
            guided = outs[:1] + inv.guidance * (outs[p + 1 : p + 2] - outs[:1])
            moved = ddim_update(
                model, x, guided, t, t_next, _eta(inv, t), noise(i, p), inv.prediction
            )
            value = value + moved * masks[p : p + 1]
        x = torch.where(count > 0, value / count.clamp_min(1e-12), value)
    return torch.stack(xs)


class Draw:
    """One crop draw's inputs: a latent, the guided view's own, a label with two of DIFF's
    class prompts, and seeded noise."""

    def __init__(self, model: DiffusionModel, hw: tuple[int, int]) -> None:
        gen = torch.Generator().manual_seed(0)
        h, w = hw[0] // 8, hw[1] // 8
        self.x0 = torch.randn(1, 4, h, w, generator=gen)
        self.x0_guided = torch.randn(1, 4, h, w, generator=gen)
        label = np.zeros(hw, np.int64)
        label[: hw[0] // 2] = SIDEWALK
        label[hw[0] // 2 :, : hw[1] // 3] = RIDER
        self.label = torch.from_numpy(label)
        self.noise = {
            (i, p): torch.randn(1, 4, h, w, generator=gen) for i in range(37) for p in range(3)
        }
        self.contexts = prompt_contexts(model, ["", GUIDED_DIFF_PROMPT])
        present = [SIDEWALK, RIDER]
        masks = region_masks(self.label, present, (h, w))
        self.prompts = [(self.contexts.plain, torch.ones(1, 1, h, w))]
        self.prompts += [(self.contexts.diff[c], m) for c, m in zip(present, masks, strict=True)]

    def noise_fn(self, i: int, p: int) -> torch.Tensor:
        return self.noise[i, p]


def features(model, taps, draw: Draw, plain: torch.Tensor, guided: torch.Tensor, steps) -> int:
    """The tapped passes at DIFF's nine timesteps of both views (as extract runs them)."""
    n = 0
    for t in RECIPE["timesteps"]:
        recipe = FeatureRecipe(taps, t, 0, noise_mode("trajectory"), "diff", parse_storage("fp16"))
        i = steps.index(t)
        tap_maps(model, recipe, plain[i], "", draw.contexts.plain, draw.contexts)
        tap_maps(
            model, recipe, guided[i], GUIDED_DIFF_PROMPT, None, draw.contexts, draw.label[None]
        )
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs=2, default=[64, 64], help="crop (H, W)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    run = Run()
    torch.set_num_threads(args.threads)
    model = load_diffusion_model(
        random_sd21_folder(SD21), "fp32", args.device, parts=("unet", "text_encoder")
    )
    taps = resolve_taps(model.unet, "diff", model.vae_stride)
    draw = Draw(model, tuple(args.res))
    counter = Counter(model.unet)
    whole, cut = recipe_inversion(last_timestep=None), recipe_inversion()

    def before() -> tuple[torch.Tensor, torch.Tensor]:
        plain = invert_before(model, draw.x0, whole, draw.contexts, draw.noise_fn)
        guided = invert_guided_before(
            model, draw.x0_guided, whole, draw.contexts.plain, draw.prompts, draw.noise_fn
        )
        features(model, taps, draw, plain, guided, whole.unet_timesteps())
        return plain, guided

    def after() -> tuple[torch.Tensor, torch.Tensor]:
        plain = invert(model, draw.x0, cut, draw.contexts.plain, draw.contexts.plain, draw.noise_fn)
        guided = invert_guided(
            model, draw.x0_guided, cut, draw.contexts.plain, [draw.prompts], [draw.noise_fn]
        )
        features(model, taps, draw, plain, guided, cut.unet_timesteps())
        return plain, guided

    arms = {"before": before, "after": after}
    seconds: dict[str, list[float]] = {k: [] for k in arms}
    passes: dict[str, int] = {}
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for r in range(args.rounds):
        for name, fn in arms.items():
            counter.calls = counter.passes = 0
            sync(args.device)
            t0 = time.perf_counter()
            kept[name] = fn()
            sync(args.device)
            seconds[name].append(time.perf_counter() - t0)
            passes[name] = counter.passes
            print(f"round {r}: {name} {seconds[name][-1]:.1f} s, {passes[name]} passes", flush=True)
    run.check(passes == {"before": 221, "after": 168}, "passes per draw", passes)
    diff = max(
        (a[:34] - b).abs().max().item() for a, b in zip(kept["before"], kept["after"], strict=True)
    )
    run.check(diff < 1e-4, "the latents the stores read differ between the arms", {"max": diff})
    out = {
        name: {
            "median_s": round(statistics.median(v), 2),
            "min_s": round(min(v), 2),
            "max_s": round(max(v), 2),
            "rounds_s": [round(x, 2) for x in v],
            "unet_passes": passes[name],
        }
        for name, v in seconds.items()
    }
    out["before_over_after"] = round(out["before"]["median_s"] / out["after"]["median_s"], 2)
    run.write(
        RESULTS,
        {
            "settings": {
                **vars(args),
                "crop": list(args.res),
                "dtype": "fp32",
                "timesteps": RECIPE["timesteps"],
                "class_prompts_in_the_crop": 2,
            },
            "per_draw": out,
            "max_abs_latent_difference": diff,
        },
    )
    print(out)


if __name__ == "__main__":
    main()
