"""Test-time prompt tuning (Gong et al.): learn the scene prompt's token embeddings on a target domain.

Everything is frozen (UNet, VAE, text encoder, fusion + head) except a (n_tokens, D) tensor that
replaces the prompt's word embeddings at the text encoder's input. Features are computed online
(the gradient must flow through the UNet into the prompt) exactly as `extract` computes them:
the store's timesteps, noise seeds and taps, so the frozen head sees what it was trained on.

Objective: mean per-pixel prediction entropy (Tent, Wang et al. 2021). It needs no labels, is
low exactly where the frozen head is confident (which under a domain shift tracks accuracy), and
with only the prompt learnable the head cannot collapse to a trivial solution by itself; an
optional confidence weighting (EATA) keeps high-entropy, likely-wrong pixels from dominating,
and an optional diversity term (SHOT's information maximization) counters a drift towards few
classes. Pseudo-labels from the same frozen head would only be a hard version of the same signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from pydantic import Field
from pydantic.dataclasses import dataclass
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from dvclive import Live
from pipeline.cache.encoded import (
    open_labels,
    open_latents,
    read_index,
    read_prompts,
    read_whole,
    set_index,
    split_rows,
    target_domains,
)
from pipeline.cache.store import FeatureStore, store_path
from pipeline.cache.trajectories import open_trajectory, trajectory_step
from pipeline.core.device import resolve_device, set_threads
from pipeline.core.errors import DataError, ModelError, StoreError
from pipeline.core.fileio import atomic_path, write_json
from pipeline.core.names import FeatureKey
from pipeline.core.params import STRICT
from pipeline.diffusion.build import ModelConfig
from pipeline.diffusion.model import DiffusionModel, load_diffusion_model
from pipeline.diffusion.prompts import text_of
from pipeline.diffusion.text import eos_positions, tokenize
from pipeline.diffusion.unet_features import Contexts, prompt_contexts
from pipeline.extraction.recipe import FeatureRecipe, noised, read_values, tap_maps
from pipeline.heads.blocks import resize
from pipeline.heads.metrics import ConfusionMeter
from pipeline.heads.seg_model import SegModel
from pipeline.reporting.live import open_live

Positive = Annotated[int, Field(ge=1)]


@dataclass(config=STRICT)
class TuneConfig:
    """The `tune_prompt` group (tuning starts from the head's prompt: variant 0 of the store)."""

    steps: Annotated[int, Field(ge=0)]
    lr: Annotated[float, Field(gt=0)]
    batch_size: Positive
    images: Positive  # unlabeled target images used for tuning (the first ones of the split)
    eval_images: Annotated[int, Field(ge=0)]  # labeled images scored before/after (0 = all)
    weighting: Literal["none", "confidence"]  # confidence: EATA, pixels below a threshold
    entropy_threshold: Annotated[float, Field(gt=0, le=1)]  # a fraction of log(K)
    diversity_weight: Annotated[float, Field(ge=0)]  # > 0 adds SHOT's class-diversity term
    eval_batch_size: Positive
    seed: int
    threads: Annotated[int, Field(ge=0)]  # torch threads (tiny models on shared CPUs: 1)


@dataclasses.dataclass
class TuneResult:
    """The learned prompt and how the objective moved."""

    token_embeds: Tensor  # (n_tokens, D) learned word embeddings
    context: Tensor  # (1, L, D) text-encoder output with them: the UNet's cross-attention input
    curve: list[dict]  # {"step", "objective"}
    objective_before: float
    objective_after: float


class LearnablePrompt(nn.Module):
    """A prompt whose word embeddings are a learnable tensor fed through the frozen text encoder.

    The tokenizer's ids fix the special tokens, padding and positions; a forward hook on the
    token-embedding lookup swaps in `token_embeds` for the prompt's own tokens (between the
    start and the first end-of-text token). The encoder's weights are never touched.
    """

    def __init__(self, model: DiffusionModel, text: str) -> None:
        super().__init__()
        ids = tokenize(model.tokenizer, [text])
        n = int(eos_positions(model.tokenizer, ids)[0]) - 1
        if n < 1:
            raise ModelError(f"prompt {text!r} has no tokens to learn")
        self.n_tokens = n
        self.register_buffer("input_ids", ids, persistent=False)
        # Not a submodule: parameters() must yield the prompt only.
        self._encoder = (model.text_encoder,)
        lookup = model.text_encoder.get_input_embeddings()
        with torch.no_grad():
            init = lookup(ids.to(lookup.weight.device))[0, 1 : 1 + n].float().clone()
        self.token_embeds = nn.Parameter(init)

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        lookup = self._encoder[0].get_input_embeddings()

        def hook(module: nn.Module, args: object, output: Tensor) -> Tensor:
            learned = self.token_embeds.to(output.dtype)[None].expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :1], learned, output[:, 1 + self.n_tokens :]], dim=1)

        handle = lookup.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def forward(self) -> Tensor:
        """The cross-attention context (1, L, D) of the current prompt embeddings."""
        encoder = self._encoder[0]
        with self._swapped():
            return encoder(input_ids=self.input_ids.to(encoder.device))[0]


def prediction_entropy(logits: Tensor) -> Tensor:
    """Per-pixel entropy of softmax(logits) (B, K, h, w), normalized to [0, 1] by log K."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1) / math.log(logits.shape[1])


def entropy_objective(
    logits: Tensor, weighting: str = "none", threshold: float = 0.4, diversity: float = 0.0
) -> Tensor:
    """Mean pixel entropy (optionally EATA confidence-weighted) minus `diversity` × marginal entropy."""
    ent = prediction_entropy(logits)
    if weighting == "none":
        loss = ent.mean()
    elif weighting == "confidence":
        # EATA: only confident pixels, weighted up the more confident they are (weights detached).
        w = ((ent < threshold).float() * torch.exp(threshold - ent)).detach()
        loss = (w * ent).sum() / w.sum().clamp_min(1.0)
    else:
        raise ValueError(f"unknown tune_prompt.weighting {weighting!r} (none | confidence)")
    if diversity > 0:
        mean_p = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
        marginal = -(mean_p * mean_p.clamp_min(1e-12).log()).sum() / math.log(logits.shape[1])
        loss = loss - diversity * marginal
    return loss


def online_features(
    model: DiffusionModel,
    latents_t: dict[int, Tensor],
    prompt: str,
    context: Tensor,
    recipes: list[FeatureRecipe],
    contexts: Contexts,
) -> dict[str, Tensor]:
    """Features {str(FeatureKey): (B, C, h, w)} exactly as the stores hold them, differentiable
    with respect to `context`: one UNet pass per timestep at the cached x_t (noise draw 0)."""
    out: dict[str, Tensor] = {}
    for recipe in recipes:
        maps = tap_maps(model, recipe, latents_t[recipe.timestep], prompt, context, contexts)
        for name, value in read_values(recipe, maps).items():
            out[str(FeatureKey(recipe.timestep, name))] = value
    return out


def latents_at(
    model: DiffusionModel,
    recipes: list[FeatureRecipe],
    clean: Tensor,
    shas: Sequence[str],
    trajectory: zarr.Array | None,
    rows: list[int],
) -> dict[int, Tensor]:
    """x_t (N, C, h, w) of some images for every recipe's timestep: noised as extract noises
    them, or read from the cached inversion (draw 0)."""
    out = {}
    for recipe in recipes:
        if recipe.noise.inverts:
            if trajectory is None:
                raise StoreError("the stores were extracted from a trajectory; none was given")
            step = trajectory_step(trajectory, recipe.timestep)
            x = np.stack([read_whole(trajectory, (r, 0, step)) for r in rows])
            out[recipe.timestep] = torch.from_numpy(x)
        else:
            out[recipe.timestep] = noised(model, recipe, clean.to(model.device), shas, 0)
    return {t: x.to(model.device, model.dtype) for t, x in out.items()}


def freeze(*modules: nn.Module) -> None:
    """requires_grad False and eval mode (dropout off) for every module."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def tune_prompt(
    model: DiffusionModel,
    head: nn.Module,
    latents_t: dict[int, Tensor],
    recipes: list[FeatureRecipe],
    init_prompt: str,
    contexts: Contexts,
    cfg: TuneConfig,
    progress: bool = True,
    log: Callable[[int, float], None] | None = None,
) -> TuneResult:
    """Learn the prompt's token embeddings on unlabeled target images (their x_t per timestep);
    `log(step, objective)` sees every step."""
    n = min(cfg.images, len(next(iter(latents_t.values()))))
    if n < 1:
        raise ModelError("tune_prompt: no target images to tune on")
    freeze(model.unet, model.text_encoder, head)
    prompt = LearnablePrompt(model, text_of(init_prompt)[0])
    opt = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)

    def objective(idx: Tensor) -> Tensor:
        x_t = {t: x[idx] for t, x in latents_t.items()}
        feats = online_features(model, x_t, init_prompt, prompt(), recipes, contexts)
        return entropy_objective(
            head(feats), cfg.weighting, cfg.entropy_threshold, cfg.diversity_weight
        )

    def full_objective() -> float:
        with torch.no_grad():
            chunks = torch.arange(n).split(cfg.eval_batch_size)
            return float(sum(objective(c) * len(c) for c in chunks) / n)

    before = full_objective()
    curve = []
    for step in tqdm(range(cfg.steps), desc="tune prompt", disable=not progress):
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        loss = objective(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append({"step": step + 1, "objective": float(loss.detach())})
        if log is not None:
            log(step + 1, curve[-1]["objective"])
    after = full_objective()
    with torch.no_grad():
        context = prompt().detach().float().cpu()
    return TuneResult(prompt.token_embeds.detach().float().cpu(), context, curve, before, after)


@torch.no_grad()
def evaluate_online(
    model: DiffusionModel,
    head: nn.Module,
    latents_t: dict[int, Tensor],
    labels: np.ndarray | Tensor,
    prompt: str,
    context: Tensor,
    recipes: list[FeatureRecipe],
    contexts: Contexts,
    batch_size: int,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict:
    """Scores (metrics/evaluate.json's shape) of the head on online features under `context`."""
    freeze(model.unet, model.text_encoder, head)
    meter = ConfusionMeter()
    context = context.to(model.device)
    n = len(labels)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
        stop = min(start + batch_size, n)
        label = torch.as_tensor(np.asarray(labels[start:stop])).long()
        x_t = {t: x[start:stop] for t, x in latents_t.items()}
        feats = online_features(model, x_t, prompt, context, recipes, contexts)
        logits = resize(head(feats).float(), label.shape[-2:])
        meter.update(logits.argmax(1).cpu(), label)
    return meter.scores()


def nearest_words(model: DiffusionModel, token_embeds: Tensor) -> str:
    """The vocabulary tokens nearest (cosine) to each learned embedding: a readable prompt."""
    table = model.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    sims = F.normalize(token_embeds.float(), dim=1) @ F.normalize(table, dim=1).T
    tokens = model.tokenizer.convert_ids_to_tokens(sims.argmax(dim=1).tolist())
    return model.tokenizer.convert_tokens_to_string(tokens).strip()


def recipes_of_head(
    model: DiffusionModel, head_inputs: dict[str, tuple[int, int]], features_dir: str, name: str
) -> list[FeatureRecipe]:
    """The online passes that reproduce the stores behind the head's input keys, by timestep."""
    wanted: dict[int, list[str]] = {}
    for key in head_inputs:
        k = FeatureKey.parse(key)
        wanted.setdefault(k.timestep, []).append(k.tap)
    recipes = []
    for t, names in sorted(wanted.items()):
        store = FeatureStore.open(store_path(features_dir, t, name))
        recipe = FeatureRecipe.of_store(model, store)
        recipe.taps = [tap for tap in recipe.taps if tap.name in names]
        recipes.append(recipe)
    return recipes


def tune_domains(
    model: DiffusionModel,
    head: nn.Module,
    encoded_dir: str | os.PathLike[str],
    trajectories_dir: str | os.PathLike[str],
    features_dir: str,
    init_prompt: str,
    domains: Sequence[str],
    cfg: TuneConfig,
    progress: bool = True,
    live: Live | None = None,
) -> tuple[dict[str, dict], dict[str, dict[str, Tensor]]]:
    """Per target domain: scores before/after tuning (evaluate.json's shape + "prompt") and tensors."""
    index = read_index(encoded_dir)
    metrics: dict[str, dict] = {}
    tensors: dict[str, dict[str, Tensor]] = {}
    contexts = prompt_contexts(model, [init_prompt]).to(model.device, model.dtype)
    with torch.no_grad():
        start_context = LearnablePrompt(model, text_of(init_prompt)[0])().detach()
    for domain in domains:
        found = split_rows(index, domain, "val")
        if found is None:
            raise DataError(f"{encoded_dir}: no val images of target domain {domain!r}")
        name, rows = found
        recipes = recipes_of_head(model, head.input_specs, features_dir, name)
        eval_rows = rows[: cfg.eval_images] if cfg.eval_images > 0 else rows
        rows = rows[: max(len(eval_rows), min(cfg.images, len(rows)))]
        latents = open_latents(encoded_dir, name)
        clean = torch.from_numpy(np.stack([read_whole(latents, (r, 0)) for r in rows]))
        shas = [str(s) for s in set_index(index, name)["sha256"].iloc[rows]]
        trajectory = None
        if any(r.noise.inverts for r in recipes):
            trajectory = open_trajectory(trajectories_dir, name, guided=False)
        latents_t = latents_at(model, recipes, clean, shas, trajectory, rows)
        labels_array = open_labels(encoded_dir, name)
        labels = np.stack([read_whole(labels_array, r) for r in eval_rows])
        n_eval = len(eval_rows)
        scored = {t: x[:n_eval] for t, x in latents_t.items()}
        rest = (recipes, contexts, cfg.eval_batch_size, progress, domain)
        before = evaluate_online(model, head, scored, labels, init_prompt, start_context, *rest)
        log = None if live is None else _logger(live, f"{domain}/objective")
        result = tune_prompt(
            model, head, latents_t, recipes, init_prompt, contexts, cfg, progress, log
        )
        after = evaluate_online(model, head, scored, labels, init_prompt, result.context, *rest)
        words = nearest_words(model, result.token_embeds)
        metrics[domain] = {
            "before": before,
            "after": after,
            "prompt": words,
            "init_prompt": init_prompt,
            "objective": {"before": result.objective_before, "after": result.objective_after},
        }
        tensors[domain] = {"token_embeds": result.token_embeds, "context": result.context}
        if progress:
            print(
                f"{domain}: mIoU {before['mIoU']} -> {after['mIoU']}, objective "
                f"{result.objective_before:.4f} -> {result.objective_after:.4f}, "
                f"nearest words {words!r}",
                flush=True,
            )
    return metrics, tensors


def _logger(live: Live, name: str) -> Callable[[int, float], None]:
    def log(step: int, value: float) -> None:
        live.step = step
        live.log_metric(name, value)
        live.make_summary()

    return log


def save_prompts(
    tensors: dict[str, dict[str, Tensor]],
    metrics: dict[str, dict],
    out_dir: str | os.PathLike[str],
    model_fingerprint: str,
) -> None:
    """data/prompts/<domain>.safetensors (token_embeds (n, D), context (1, L, D)), atomically."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for domain, parts in tensors.items():
            meta = {
                "domain": domain,
                "init_prompt": str(metrics[domain]["init_prompt"]),
                "nearest_words": str(metrics[domain]["prompt"]),
                "model_fingerprint": model_fingerprint,
            }
            # One metadata key: safetensors writes several in a random order (files would differ).
            save_file(
                {k: v.contiguous() for k, v in parts.items()},
                str(tmp / f"{domain}.safetensors"),
                {"prompt": json.dumps(meta, sort_keys=True)},
            )


def run(
    cfg: TuneConfig,
    model_cfg: ModelConfig,
    model_dir: str,
    heads_dir: str,
    encoded_dir: str,
    trajectories_dir: str,
    features_dir: str,
    out: str,
    results_path: str,
    metrics_path: str,
    live_dir: str,
) -> None:
    """The tune_prompt stage: tune per target domain, or skip with a reason (empty outputs).

    `results_path` gets metrics/tune_prompt.json's contract (scores before and after per
    domain, the learned prompt), `metrics_path` the mIoU before and after, `live_dir` dvclive's
    objective curves."""
    set_threads(cfg.threads)
    start = time.perf_counter()
    live = open_live(live_dir)
    # The UNet and the text encoder (latents are cached): no VAE.
    parts = ("unet", "text_encoder")
    model = load_diffusion_model(
        model_dir,
        model_cfg.dtype,
        resolve_device(model_cfg.device, "model.device"),
        parts=parts,
        unet=model_cfg.unet,
    )
    head = SegModel.from_pretrained(heads_dir, device=model.device)
    init_prompt = read_prompts(encoded_dir).texts[0]
    domains = target_domains(read_index(encoded_dir))
    skip = None
    if head.fusion_config.kind == "pixels":
        skip = "the head was trained from pixels (train.features: pixels)"
    elif not text_of(init_prompt)[0].strip() or init_prompt.startswith("<"):
        skip = f"variant 0 is {init_prompt!r} (prompts.variants[0]): no text tokens to learn"
    if skip:
        # Nothing to tune: empty outputs keep the graph and the metrics diffs valid.
        save_prompts({}, {}, out, model.fingerprint)
        live.end()
        write_json(results_path, {})
        write_json(metrics_path, {})
        print(f"tune_prompt: skipped, {skip}")
        return
    metrics, tensors = tune_domains(
        model,
        head,
        encoded_dir,
        trajectories_dir,
        features_dir,
        init_prompt,
        domains,
        cfg,
        live=live,
    )
    live.end()
    save_prompts(tensors, metrics, out, model.fingerprint)
    write_json(results_path, metrics)
    write_json(
        metrics_path,
        {
            d: {"before": m["before"]["mIoU"], "after": m["after"]["mIoU"]}
            for d, m in metrics.items()
        },
    )
    print(f"tune_prompt: {len(domains)} domains in {time.perf_counter() - start:.1f} s")
