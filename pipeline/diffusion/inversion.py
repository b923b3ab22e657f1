"""DIFF's DDIM inversion: one trajectory per image (and draw), plain or mask-guided.

Mirrors DIFF's `generalized_steps` (src/archs/stable_diffusion/diffusion.py:102-291):
- the schedule is its `scheduler_timesteps` (descending, e.g. [160, 139, ..., 2, 1]); step i
  runs the UNet at t = seq_next[i] on x_i and moves to seq[i], where seq is the schedule
  ascending and seq_next = [0] + seq[:-1] (diffusion.py:106-125). So the UNet of step 0 sees
  the clean latent at t = 0, and features "saved at step i" come from t = seq[i - 1]: the
  off-by-one of DIFF's save_timestep;
- the update is DDIM with eta: fresh noise only for s_tmin < t < s_tmax (diffusion.py:258-262,
  75-99), classifier-free guidance on the UNet outputs (diffusion.py:229-256);
- the guided path (`do_mask_steps`, diffusion.py:162-198, 269-285) runs the unconditional
  prompt plus one pass per prompt (the plain prompt over the whole image and each present
  class's prompt over its ground-truth mask, nearest-resized to the latent), updates x under
  each prompt with its own noise, and averages the updates where the masks overlap.
DIFF reads the UNet output as epsilon (`get_xt_next`, diffusion.py:80), which for SD-2.1's
v-prediction is not what the model predicts; `prediction: model` converts it properly,
`prediction: epsilon` keeps DIFF's reading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.noising import predict_x0_eps, timesteps_like
from pipeline.diffusion.text import same_context

# Noise of step i under prompt p of one batch: (i, p) -> (B, C, h, w).
NoiseFn = Callable[[int, int], Tensor]


@dataclasses.dataclass(frozen=True)
class Inversion:
    """How a trajectory is run (the `invert` group of params.yaml, as DIFF's config names it)."""

    schedule: tuple[int, ...]  # DIFF's scheduler_timesteps, descending
    eta: float
    s_tmin: int
    s_tmax: int
    guidance: float
    prediction: str  # model | epsilon (DIFF's reading of the output)
    # The UNet timestep of the last step any store reads (DIFF: 91, its largest save_timestep);
    # None: the whole schedule. Later steps would feed nothing.
    last: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", tuple(int(t) for t in self.schedule))

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(t, next t) of every step up to `last`: the UNet runs at t on x_i, x moves to next t."""
        seq = sorted(self.schedule)
        steps = list(zip([0, *seq[:-1]], seq, strict=True))
        if self.last is None:
            return steps
        return steps[: [t for t, _ in steps].index(self.last) + 1]

    def pass_steps(self) -> list[tuple[int, int]]:
        """The steps whose UNet pass runs: every step but the last, whose x is stored and
        whose update would feed nothing (the loops run these; `passes` counts them)."""
        return self.steps[:-1]

    def unet_timesteps(self) -> list[int]:
        """The timestep the UNet runs at in each step (where features can be read)."""
        return [t for t, _ in self.steps]


def _output(model: DiffusionModel, xs: Tensor, t: int, contexts: Tensor) -> Tensor:
    """UNet outputs of rows `xs` (R, C, h, w), each under its own context (R, L, D), one call."""
    unet = model.unet
    out = unet(xs.to(unet.dtype), timesteps_like(t, xs), contexts.to(xs.device, unet.dtype))
    return out.sample.to(xs.dtype)


def passes(inv: Inversion, per_step: float = 1) -> float:
    """UNet passes of one trajectory of `per_step` passes a step (plain: 1; guided: 1 + the
    class prompts) over the steps `invert` and `invert_guided` run (Inversion.pass_steps)."""
    return len(inv.pass_steps()) * per_step


def ddim_update(
    model: DiffusionModel,
    x: Tensor,
    output: Tensor,
    t: int,
    t_next: int,
    eta: float,
    noise: Tensor,
    prediction: str,
) -> Tensor:
    """DIFF's `get_xt_next` for inversion (t < t_next): x at t_next from x at t, in float32
    whatever the UNet's dtype, as DIFF's (its ᾱ are float32 and promote the update,
    diffusion.py:108, 212; in float16 1 - ᾱ is ~15 % off at t <= 1)."""
    alphas = model.scheduler.alphas_cumprod.to(x.device, torch.float32)
    at, at_next = alphas[t], alphas[t_next]
    x, output, noise = x.float(), output.float(), noise.float()
    if prediction == "epsilon":
        eps = output
        x0 = (x - eps * (1 - at).sqrt()) / at.sqrt()
    else:
        x0, eps = predict_x0_eps(model, x, output, timesteps_like(t, x))
    a_skip = at_next / at
    c1 = eta * ((1 - a_skip) * (1 - at_next) / (1 - at)).sqrt()
    c2 = torch.clamp((1 - at_next) - c1**2, min=1e-10).sqrt()
    return at_next.sqrt() * x0 + c1 * noise + c2 * eps


def _eta(inv: Inversion, t: int) -> float:
    return inv.eta if inv.s_tmin < t < inv.s_tmax else 0.0


@torch.no_grad()
def invert(
    model: DiffusionModel, x0: Tensor, inv: Inversion, uncond: Tensor, cond: Tensor, noise: NoiseFn
) -> Tensor:
    """The plain trajectory: x_i (S, B, C, h, w) float32, the UNet input of each of the S steps.

    DIFF's plain path: guidance between the negative prompt `uncond` and `cond` (both "" in
    DIFF, then one pass gives the same output).
    """
    xs, x = [], x0.float()
    batch = x.shape[0]
    same = same_context(cond, uncond)
    contexts = (
        uncond.expand(batch, -1, -1)
        if same
        else torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])
    )
    for i, (t, t_next) in enumerate(inv.pass_steps()):
        xs.append(x)
        if same:
            out = _output(model, x, t, contexts)
        else:
            out_u, out_c = _output(model, x.repeat(2, 1, 1, 1), t, contexts).chunk(2)
            out = out_u + inv.guidance * (out_c - out_u)
        x = ddim_update(model, x, out, t, t_next, _eta(inv, t), noise(i, 0), inv.prediction)
    return torch.stack([*xs, x])  # the last step's input: stored, its pass never run


def region_masks(label: Tensor, classes: Sequence[int], size: tuple[int, int]) -> list[Tensor]:
    """(1, 1, h, w) float masks of each class of `label` (H, W), nearest-resized to `size`."""
    out = []
    for c in classes:
        mask = (label == c).float()[None, None]
        out.append(F.interpolate(mask, size=size, mode="nearest"))
    return out


@torch.no_grad()
def invert_guided(
    model: DiffusionModel,
    x0: Tensor,
    inv: Inversion,
    uncond: Tensor,
    prompts: Sequence[Sequence[tuple[Tensor, Tensor]]],
    noise: Sequence[NoiseFn],
) -> Tensor:
    """The guided trajectories of B images, one UNet call per step for all: x_i (S, B, C, h, w).

    `prompts[b]` are image b's (context (1, L, D), mask (1, 1, h, w)) pairs: the plain prompt
    with an all-ones mask first, then each present class's prompt with its mask; `noise[b]`
    its noise ((1, C, h, w) of step i and prompt p). A prompt equal to `uncond` (DIFF's plain
    prompt "") gets the unconditional output, which DIFF computes a second time.
    """
    batch = x0.shape[0]
    own = [
        [p for p, (c, _) in enumerate(pairs) if not same_context(c, uncond)] for pairs in prompts
    ]
    contexts = torch.cat(
        [uncond.expand(batch, -1, -1)] + [prompts[b][p][0] for b in range(batch) for p in own[b]]
    )
    rows = [b for b in range(batch) for _ in own[b]]  # the image of each prompt row
    masks = [torch.cat([m for _, m in pairs]).to(x0.device, torch.float32) for pairs in prompts]
    counts = [m.sum(dim=0, keepdim=True) for m in masks]
    xs, x = [], x0.float()
    for i, (t, t_next) in enumerate(inv.pass_steps()):
        xs.append(x)
        outs = _output(model, torch.cat([x, x[rows]]), t, contexts)
        row = batch
        moved = []
        for b in range(batch):
            out_u, value = outs[b : b + 1], torch.zeros_like(x[b : b + 1])
            for p in range(len(prompts[b])):
                out_p = out_u
                if p in own[b]:
                    out_p, row = outs[row : row + 1], row + 1
                guided = out_u + inv.guidance * (out_p - out_u)
                step = ddim_update(
                    model,
                    x[b : b + 1],
                    guided,
                    t,
                    t_next,
                    _eta(inv, t),
                    noise[b](i, p),
                    inv.prediction,
                )
                value = value + step * masks[b][p : p + 1]
            moved.append(torch.where(counts[b] > 0, value / counts[b].clamp_min(1e-12), value))
        x = torch.cat(moved)
    return torch.stack([*xs, x])
