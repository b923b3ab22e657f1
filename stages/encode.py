"""DVC stage encode: image index, VAE latents, resized labels and prompt embeddings -> data/encoded/."""

from __future__ import annotations

import argparse
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.diffusion import load_diffusion_model
from pipeline.encode import EncodeConfig, build_index, encode_dataset
from pipeline.errors import DataError, run_stage
from pipeline.params import from_dict, load_params
from pipeline.prompts import PromptConfig, variant_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifests", default="data/manifests")
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--out", default="data/encoded")
    args = ap.parse_args()
    params = load_params(args.params)
    # The store's prompt axis is the `prompts` group's variants, in order (variant 0 first).
    texts = variant_prompts(from_dict(PromptConfig, params.get("prompts", {})))
    cfg = from_dict(EncodeConfig, {**params["encode"], "prompts": list(texts.values())})
    model_params = params.get("model", {})
    manifests = sorted(Path(args.manifests).glob("*.parquet"))
    if not manifests:
        raise DataError(f"{args.manifests}: no manifests (*.parquet); run prepare")
    model = load_diffusion_model(
        args.model,
        dtype=str(model_params.get("dtype", "fp32")),
        device=str(model_params.get("device", "cpu")),
    )
    index = build_index(manifests)
    encode_dataset(model, index, args.out, cfg)
    print(f"encoded {len(index)} images from {len(manifests)} manifests -> {args.out}")


if __name__ == "__main__":
    run_stage("encode", main)
