"""DVC stage tune_prompt: learn the scene prompt per target domain (online UNet), score before/after.

Writes metrics/tune_prompt.json ({domain: {"before", "after", "prompt", ...}}) and
data/prompts/<domain>.safetensors.
"""

from __future__ import annotations

import argparse
import time

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.device import set_threads
from pipeline.diffusion import load_diffusion_model
from pipeline.errors import run_stage
from pipeline.fileio import write_json
from pipeline.heads import SegModel
from pipeline.params import from_dict, load_params
from pipeline.prompts import PromptConfig, variant_prompts
from pipeline.tune import TuneConfig, save_prompts, setup_from_stores, tune_domains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="data/model")
    ap.add_argument("--heads", default="data/heads")
    ap.add_argument("--encoded", default="data/encoded")
    ap.add_argument("--features", default="data/features")
    ap.add_argument("--metrics", default="metrics/tune_prompt.json")
    ap.add_argument("--out", default="data/prompts")
    args = ap.parse_args()
    params = load_params(args.params)
    # Tuning starts from the prompt the head was trained with: variant 0 of the store.
    texts = variant_prompts(from_dict(PromptConfig, params.get("prompts", {})))
    cfg = from_dict(TuneConfig, {**params["tune_prompt"], "prompt": next(iter(texts.values()))})
    set_threads(cfg.threads)
    model_params = params.get("model", {})
    device = str(model_params.get("device", "cpu"))
    start = time.perf_counter()
    model = load_diffusion_model(
        args.model, dtype=str(model_params.get("dtype", "fp32")), device=device
    )
    head = SegModel.from_pretrained(args.heads, device=device)
    domains = sorted(params["data"]["targets"])
    skip = None
    if head.fusion_config.kind == "pixels":
        skip = "the head was trained from pixels (train.features: pixels)"
    elif not cfg.prompt.strip():
        skip = "variant 0 is the empty prompt (prompts.variants[0]: plain): no tokens to learn"
    if skip:
        # Nothing to tune: empty outputs keep the graph and the metrics diffs valid.
        save_prompts({}, {}, args.out, model.fingerprint)
        write_json(args.metrics, {})
        print(f"tune_prompt: skipped, {skip}")
        return
    setup = setup_from_stores(model, head.input_specs, args.features)
    metrics, tensors = tune_domains(model, head, args.encoded, setup, domains, cfg)
    save_prompts(tensors, metrics, args.out, model.fingerprint)
    write_json(args.metrics, metrics)
    print(f"tune_prompt: {len(domains)} domains in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_stage("tune_prompt", main)
