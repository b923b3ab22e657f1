"""UNet passes that return tapped feature maps, for a text prompt or a placeholder conditioning."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.core.classes import IGNORE_INDEX, NUM_CLASSES
from pipeline.core.names import CATEGORY_PROMPT, GUIDED_DIFF_PROMPT, GUIDED_PROMPT
from pipeline.diffusion.guided import guided_cross_attention
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.prompts import (
    DIFF_CLASS_PROMPTS,
    category_prompts,
    class_prompts,
    text_of,
)
from pipeline.diffusion.taps import StopForward, Tap, TapRecorder, as_maps
from pipeline.diffusion.text import encode_text, eos_states, same_context


def unet_features(
    model: DiffusionModel,
    latents_t: Tensor,
    t: int | Tensor,
    context: Tensor,
    taps: list[Tap],
    stop_early: bool = True,
    unet: torch.nn.Module | None = None,
) -> dict[str, Tensor]:
    """Tap name -> (B, C, h, w) features of noisy latents at timestep t (context (1|B, L, D));
    `unet` another UNet of the model's architecture (the cleandift stage's student)."""
    unet = model.unet if unet is None else unet
    batch = latents_t.shape[0]
    timesteps = torch.as_tensor(t, device=latents_t.device).long().reshape(-1).expand(batch)
    context = context.to(latents_t.device, unet.dtype)
    if context.shape[0] == 1:
        context = context.expand(batch, -1, -1)
    # Skipping the layers after the last tap saves most of the pass for shallow taps (dift).
    with TapRecorder(unet, {tap.name: tap.module_path for tap in taps}, stop_early) as rec:
        try:
            unet(latents_t.to(unet.dtype), timesteps, context)
        except StopForward:
            pass
    return as_maps(rec.raw, taps, tuple(latents_t.shape[-2:]), model.vae_stride)


def multi_pass_features(
    model: DiffusionModel, latents_t: Tensor, t: int, contexts: Sequence[Tensor], taps: list[Tap]
) -> dict[str, Tensor]:
    """DIFF's features of several passes at the same x_t (collect_stride_feats_with_timesteplist,
    diffusion.py:358-398 of its code): map taps (ResNets) from the first pass (the
    unconditional one), token taps (transformer blocks) summed over all passes.

    A context listed twice is computed once and counted twice (DIFF's plain path: "" and "").
    """
    unique: list[Tensor] = []
    counts: list[int] = []
    for c in contexts:
        for j, u in enumerate(unique):
            if same_context(c, u):
                counts[j] += 1
                break
        else:
            unique.append(c)
            counts.append(1)
    passes = [unet_features(model, latents_t, t, c, taps) for c in unique]
    out = {}
    for tap in taps:
        if tap.tokens:
            total = passes[0][tap.name] * counts[0] if counts[0] > 1 else passes[0][tap.name]
            for p, n in zip(passes[1:], counts[1:], strict=True):
                total = total + p[tap.name] * n
            out[tap.name] = total
        else:
            out[tap.name] = passes[0][tap.name]
    return out


def variant_contexts(prompt: str, conditioning: str) -> tuple[str, ...]:
    """The contexts one stored variant's passes run under, by name: "" (DIFF's negative prompt,
    the plain context), "own" (the variant's), "classes" (one per class prompt its image
    holds). variant_features runs exactly these; a context listed twice runs once and counts
    twice (multi_pass_features), as DIFF's "" and "" do."""
    if prompt == GUIDED_DIFF_PROMPT:
        return ("", "", "classes")
    return ("", "own") if conditioning == "diff" else ("own",)


def variant_passes(prompt: str, conditioning: str, classes: float = 0) -> float:
    """UNet passes per image of one stored variant: its distinct contexts (variant_contexts;
    the plain prompts' own context is the plain one), `classes` for the class prompts (0
    unlabeled; the plan's average over a set)."""
    plain = prompt in ("", GUIDED_PROMPT)
    names = {"" if n == "own" and plain else n for n in variant_contexts(prompt, conditioning)}
    return len(names - {"classes"}) + (classes if "classes" in names else 0)


@dataclasses.dataclass
class Contexts:
    """The conditioning a run's variants need besides their own text embeddings."""

    plain: Tensor  # "" (1, L, D): DIFF's negative prompt, and the plain prompt
    region: Tensor | None = None  # (19, L, D) class prompts of the region-attention variant
    diff: dict[int, Tensor] = dataclasses.field(default_factory=dict)  # DIFF's, by train id
    category: Tensor | None = None  # (1, 19, D): each class's averaged end-of-text state

    def to(self, device: torch.device, dtype: torch.dtype) -> Contexts:
        move = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
        return Contexts(
            move(self.plain),
            move(self.region),
            {k: move(v) for k, v in self.diff.items()},
            move(self.category),
        )


@torch.no_grad()
def prompt_contexts(model: DiffusionModel, prompts: Sequence[str]) -> Contexts:
    """What the variants among `prompts` need: class prompts, category tokens, the plain prompt."""
    ctx = Contexts(plain=encode_text(model, [""]))
    if GUIDED_PROMPT in prompts:
        ctx.region = encode_text(model, class_prompts())
    if GUIDED_DIFF_PROMPT in prompts:
        ids = sorted(DIFF_CLASS_PROMPTS)
        embeds = encode_text(model, [DIFF_CLASS_PROMPTS[i] for i in ids])
        ctx.diff = {i: embeds[k : k + 1] for k, i in enumerate(ids)}
    if any(p == CATEGORY_PROMPT or text_of(p)[1] for p in prompts):
        templates = category_prompts()
        flat = eos_states(model, [t for per_class in templates for t in per_class])
        ctx.category = flat.view(len(templates), len(templates[0]), -1).mean(dim=1)[None]
    return ctx


def variant_features(
    model: DiffusionModel,
    latents_t: Tensor,
    t: int,
    prompt: str,
    prompt_embeds: Tensor | None,
    taps: list[Tap],
    labels: Tensor | None,
    contexts: Contexts,
    conditioning: str = "single",
) -> dict[str, Tensor]:
    """Features of one stored variant at x_t.

    `prompt` is its stored text: a text prompt (with `prompt_embeds`, (1, L, D); "+category"
    appends the class tokens), "<category>", "<guided>" or "<guided-diff>". `conditioning`
    "single" runs one pass with the variant's context; "diff" DIFF's passes (the negative ""
    prompt, then the variant's), ResNets from the first, attention summed. For the guided
    variants `labels` (B, H, W) are the guide; rows labeled 255 everywhere (and None) get the
    plain features.
    """
    if prompt == GUIDED_DIFF_PROMPT:
        return _diff_guided(model, latents_t, t, taps, labels, contexts)
    if prompt == GUIDED_PROMPT:
        context = contexts.plain
        if labels is not None:
            if contexts.region is None or contexts.region.shape[0] != NUM_CLASSES:
                raise ValueError(f"the region variant needs {NUM_CLASSES} class prompts")
            with guided_cross_attention(model.unet, labels, contexts.region):
                return _conditioned(
                    model, latents_t, t, prompt, context, taps, contexts, conditioning
                )
    elif prompt == CATEGORY_PROMPT:
        context = contexts.category
    else:
        context = prompt_embeds
        if text_of(prompt)[1]:
            context = torch.cat([context, contexts.category.to(context)], dim=1)
    return _conditioned(model, latents_t, t, prompt, context, taps, contexts, conditioning)


def _conditioned(model, latents_t, t, prompt, context, taps, contexts, conditioning):
    named = {"": contexts.plain, "own": context}
    passes = [named[n] for n in variant_contexts(prompt, conditioning)]
    return multi_pass_features(model, latents_t, t, passes, taps)


def _diff_guided(model, latents_t, t, taps, labels, contexts):
    # Rows sharing the set of present classes run as one batch (unlabeled batches, the
    # targets, exactly as the plain variant's passes); DIFF itself runs one image at a time.
    groups: dict[tuple[int, ...], list[int]] = {}
    for b in range(latents_t.shape[0]):
        present = (
            ()
            if labels is None
            else tuple(sorted(set(torch.unique(labels[b]).tolist()) & set(contexts.diff)))
        )
        groups.setdefault(present, []).append(b)
    out = {tap.name: [None] * latents_t.shape[0] for tap in taps}
    for present, rows in groups.items():
        named = {"": [contexts.plain], "classes": [contexts.diff[c] for c in present]}
        passes = [c for n in variant_contexts(GUIDED_DIFF_PROMPT, "diff") for c in named[n]]
        feats = multi_pass_features(model, latents_t[rows], t, passes, taps)
        for tap in taps:
            for j, b in enumerate(rows):
                out[tap.name][b] = feats[tap.name][j]
    return {name: torch.stack(rows) for name, rows in out.items()}


def guide_labels(labels: np.ndarray, splits: Sequence[str], split: str = "train") -> np.ndarray:
    """Labels (B, H, W) for the guided variant: rows of `split` kept, all other rows 255.

    Only the source domain has a train split, so target (and val) images get exactly the
    plain-prompt features in the guided slot: never a label leak into evaluation.
    """
    keep = np.array([s == split for s in splits], dtype=bool)
    out = np.array(labels, copy=True)
    out[~keep] = IGNORE_INDEX
    return out
