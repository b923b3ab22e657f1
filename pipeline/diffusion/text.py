"""Prompts through the CLIP tokenizer and text encoder: the UNet's cross-attention context."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.core.errors import ConfigError, ModelError
from pipeline.diffusion.model import DiffusionModel
from pipeline.diffusion.prompts import text_of


def same_context(a: Tensor, b: Tensor) -> bool:
    """Two text-encoder outputs that condition the UNet alike (one pass serves both)."""
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def tokenize(tokenizer, prompts: list[str]) -> Tensor:
    """Token ids (P, L), padded/truncated to the text encoder's context length, as SD does."""
    length = min(int(tokenizer.model_max_length), 77)
    enc = tokenizer(
        prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return enc.input_ids


def check_prompt_lengths(tokenizer, texts: dict[str, str]) -> None:
    """Refuse, naming the variant, a prompt longer than the text encoder's context: `tokenize`
    would cut it, and the words beyond would never reach the UNet."""
    length = min(int(tokenizer.model_max_length), 77)
    for name, text in texts.items():
        tokens = len(tokenizer(text_of(text)[0], verbose=False).input_ids)
        if tokens > length:
            raise ConfigError(
                f"prompts.variants {name}: {tokens} tokens, the text encoder reads {length} "
                f"(the rest would be cut); shorten prompts.scene or its condition words"
            )


def encode_text(model: DiffusionModel, prompts: list[str]) -> Tensor:
    """Last hidden states (P, L, D) of the text encoder (gradients flow when enabled)."""
    ids = tokenize(model.tokenizer, prompts).to(model.text_encoder.device)
    return model.text_encoder(input_ids=ids)[0]


def eos_positions(tokenizer, ids: Tensor) -> Tensor:
    """Index of the first end-of-text token of each row of `ids` (P, L)."""
    is_eos = ids == tokenizer.eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ModelError("tokenizer: a prompt has no end-of-text token (prompt too long?)")
    return is_eos.int().argmax(dim=1)


@torch.no_grad()
def eos_states(model: DiffusionModel, prompts: list[str]) -> Tensor:
    """Each prompt's end-of-text hidden state (P, D): one token that summarizes the prompt."""
    ids = tokenize(model.tokenizer, prompts).to(model.text_encoder.device)
    hidden = model.text_encoder(input_ids=ids)[0]
    return hidden[torch.arange(len(prompts)), eos_positions(model.tokenizer, ids)]
