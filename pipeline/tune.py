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
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.encoded import open_labels, open_latents, read_index
from pipeline.errors import DataError, ModelError, StoreError
from pipeline.fileio import atomic_path
from pipeline.fusion import parse_key
from pipeline.metrics import ConfusionMeter
from pipeline.prompts import eos_positions, tokenize
from pipeline.reader import select_indices
from pipeline.store import FeatureStore
from pipeline.taps import resolve_taps


@dataclasses.dataclass
class TuneConfig:
    """The `tune_prompt` group of params.yaml."""

    prompt: str = "a photo of a city street"  # the prompt tuning starts from (the head's prompt)
    steps: int = 10
    lr: float = 0.01
    batch_size: int = 2
    images: int = 8  # unlabeled target images used for tuning (the first ones of the split)
    weighting: str = "none"  # none | confidence (EATA: only pixels below an entropy threshold)
    entropy_threshold: float = 0.4  # fraction of log(K), for weighting: confidence
    diversity_weight: float = 0.0  # > 0 adds SHOT's class-diversity term
    eval_images: int = 40  # labeled images scored before/after (first ones of the split; 0 = all)
    eval_batch_size: int = 8
    seed: int = 0
    threads: int = 1  # torch intra-op threads (tiny models on shared CPUs: 1 is fastest; 0 = keep)


@dataclasses.dataclass
class OnlineSetup:
    """What the online UNet pass needs to reproduce the cached features the head was trained on."""

    timesteps: list[int]
    taps: dict[int, list[Any]]  # timestep -> list[Tap] to read at that timestep
    noise_seed: int = 0
    noise_mode: str = "add"  # add | ddim_inversion (as the store's identity says)
    inversion_steps: int = 5
    # "t{t}/{tap}" -> (components (k, C), mean (C,)) for PCA stores; absent = no projection.
    projections: dict[str, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)


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

    def __init__(self, model: Any, text: str) -> None:
        super().__init__()
        ids = tokenize(model.tokenizer, [text])
        n = int(eos_positions(model.tokenizer, ids)[0]) - 1
        if n < 1:
            raise ModelError(f"tune_prompt.prompt {text!r} has no tokens to learn")
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


def noisy_latents(
    model: Any, latents: Tensor, sha256s: Sequence[str], t: int, setup: OnlineSetup, context: Tensor
) -> Tensor:
    """Latents at timestep t with the same per-image noise `extract` draws (seeded by content)."""
    from pipeline.noising import noise_latents

    mode = "add" if setup.noise_mode in ("add", "add_noise") else setup.noise_mode
    return noise_latents(
        model,
        latents,
        t,
        list(sha256s),
        setup.noise_seed,
        mode=mode,
        prompt_embeds=context,
        inversion_steps=setup.inversion_steps,
    )


def online_features(
    model: Any, latents: Tensor, sha256s: Sequence[str], context: Tensor, setup: OnlineSetup
) -> dict[str, Tensor]:
    """Features {"t{t}/{tap}": (B, C, h, w)} of one online UNet pass per timestep (differentiable)."""
    from pipeline.features import unet_features

    batch = latents.shape[0]
    ctx = context.expand(batch, -1, -1) if context.shape[0] == 1 else context
    out: dict[str, Tensor] = {}
    for t in setup.timesteps:
        with torch.no_grad():
            x_t = noisy_latents(model, latents, sha256s, t, setup, ctx.detach())
        feats = unet_features(model, x_t, t, ctx, setup.taps[t])
        for name, value in feats.items():
            key = f"t{t}/{name}"
            value = value.float()
            if key in setup.projections:
                comp, mean = setup.projections[key]
                value = torch.einsum(
                    "kc,bchw->bkhw", comp.to(value), value - mean.to(value)[:, None, None]
                )
            out[key] = value
    return out


def freeze(*modules: nn.Module) -> None:
    """requires_grad False and eval mode (dropout off) for every module."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def tune_prompt(
    model: Any,
    head: nn.Module,
    latents: Tensor,
    sha256s: Sequence[str],
    setup: OnlineSetup,
    cfg: TuneConfig,
    progress: bool = True,
) -> TuneResult:
    """Learn the prompt's token embeddings on unlabeled target latents (N, 4, h, w)."""
    n = min(cfg.images, latents.shape[0])
    if n < 1:
        raise ModelError("tune_prompt: no target images to tune on")
    freeze(model.unet, model.text_encoder, model.vae, head)
    prompt = LearnablePrompt(model, cfg.prompt)
    opt = torch.optim.Adam(prompt.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = model.unet.device
    lat = latents[:n].to(device)
    shas = list(sha256s[:n])

    def objective(idx: Tensor) -> Tensor:
        feats = online_features(model, lat[idx], [shas[i] for i in idx], prompt(), setup)
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
    after = full_objective()
    with torch.no_grad():
        context = prompt().detach().float().cpu()
    return TuneResult(prompt.token_embeds.detach().float().cpu(), context, curve, before, after)


@torch.no_grad()
def evaluate_online(
    model: Any,
    head: nn.Module,
    latents: Tensor,
    sha256s: Sequence[str],
    labels: np.ndarray | Tensor,
    context: Tensor,
    setup: OnlineSetup,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "evaluate",
) -> dict:
    """Scores (DESIGN §3 contract) of the head on online features under `context`."""
    freeze(model.unet, model.text_encoder, model.vae, head)
    meter = ConfusionMeter()
    device = model.unet.device
    context = context.to(device)
    for start in tqdm(range(0, latents.shape[0], batch_size), desc=desc, disable=not progress):
        stop = min(start + batch_size, latents.shape[0])
        label = torch.as_tensor(np.asarray(labels[start:stop])).long()
        feats = online_features(
            model, latents[start:stop].to(device), sha256s[start:stop], context, setup
        )
        logits = head(feats).float()
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        meter.update(logits.argmax(1).cpu(), label)
    return meter.scores()


def nearest_words(model: Any, token_embeds: Tensor) -> str:
    """The vocabulary tokens nearest (cosine) to each learned embedding: a readable prompt."""
    table = model.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    sims = F.normalize(token_embeds.float(), dim=1) @ F.normalize(table, dim=1).T
    tokens = model.tokenizer.convert_ids_to_tokens(sims.argmax(dim=1).tolist())
    return model.tokenizer.convert_tokens_to_string(tokens).strip()


def setup_from_stores(
    model: Any, head_inputs: dict[str, tuple[int, int]], features_dir: str | os.PathLike[str]
) -> OnlineSetup:
    """The online pass that reproduces the stores `t<t>/` behind the head's input keys."""
    wanted: dict[int, list[str]] = {}
    for key in head_inputs:
        t, tap = parse_key(key)
        wanted.setdefault(t, []).append(tap)
    taps: dict[int, list[Any]] = {}
    projections: dict[str, tuple[Tensor, Tensor]] = {}
    noise: set[tuple[int, str]] = set()
    for t, names in sorted(wanted.items()):
        store = FeatureStore.open(Path(features_dir) / f"t{t}")
        ident = store.identity
        if ident.model_fingerprint != model.fingerprint:
            raise StoreError(
                f"{store.path}: features of model {ident.model_fingerprint}, "
                f"but the loaded model is {model.fingerprint}"
            )
        modules = dict(zip(ident.taps, ident.tap_modules, strict=False))
        missing = [n for n in names if n not in modules]
        if missing:
            raise StoreError(f"{store.path}: no module path recorded for taps {missing}")
        resolved = resolve_taps(model.unet, [modules[n] for n in names], model.vae_stride)
        taps[t] = [dataclasses.replace(tap, name=n) for tap, n in zip(resolved, names, strict=True)]
        for n in names:
            proj = store.projection(n)
            if proj is not None:
                projections[f"t{t}/{n}"] = (torch.from_numpy(proj[0]), torch.from_numpy(proj[1]))
        noise.add((ident.noise_seed, ident.noise_mode))
    if len(noise) != 1:
        raise StoreError(f"{features_dir}: stores differ in noise seed/mode {sorted(noise)}")
    seed, mode = noise.pop()
    steps = 5
    if mode.startswith("ddim_inversion"):
        mode, _, k = mode.partition("-")
        steps = int(k or 5)
    return OnlineSetup(sorted(taps), taps, seed, mode, steps, projections)


def tune_domains(
    model: Any,
    head: nn.Module,
    encoded_dir: str | os.PathLike[str],
    setup: OnlineSetup,
    domains: Sequence[str],
    cfg: TuneConfig,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, dict[str, Tensor]]]:
    """Per target domain: scores before/after tuning (DESIGN §3 shape + "prompt") and tensors."""
    index = read_index(encoded_dir)
    latents_arr, labels_arr = open_latents(encoded_dir), open_labels(encoded_dir)
    metrics: dict[str, dict] = {}
    tensors: dict[str, dict[str, Tensor]] = {}
    initial = LearnablePrompt(model, cfg.prompt)
    with torch.no_grad():
        start_context = initial().detach()
    for domain in domains:
        rows = select_indices(index, domain, "val")
        if not rows:
            raise DataError(f"{encoded_dir}: no val images of target domain {domain!r}")
        eval_rows = rows[: cfg.eval_images] if cfg.eval_images > 0 else rows
        n_rows = max(len(eval_rows), min(cfg.images, len(rows)))
        rows = rows[:n_rows]
        latents = torch.from_numpy(np.asarray(latents_arr.oindex[rows], dtype=np.float32))
        shas = [str(s) for s in index["sha256"].iloc[rows]]
        labels = np.asarray(labels_arr.oindex[eval_rows])
        n_eval = len(eval_rows)

        eval_args = (latents[:n_eval], shas[:n_eval], labels)
        before = evaluate_online(
            model, head, *eval_args, start_context, setup, cfg.eval_batch_size, progress, domain
        )
        result = tune_prompt(model, head, latents, shas, setup, cfg, progress)
        after = evaluate_online(
            model, head, *eval_args, result.context, setup, cfg.eval_batch_size, progress, domain
        )
        words = nearest_words(model, result.token_embeds)
        metrics[domain] = {
            "before": before,
            "after": after,
            "prompt": words,
            "init_prompt": cfg.prompt,
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
            save_file(
                {k: v.contiguous() for k, v in parts.items()},
                str(tmp / f"{domain}.safetensors"),
                meta,
            )
