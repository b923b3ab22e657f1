"""DVC stage build_model: the small SD-family model (random init), or a checked pointer to a local folder.

Usage: python stages/build_model.py [--params params.yaml] [--out data/model_init]
"""

from __future__ import annotations

import argparse
import time

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.diffusion import (
    SmallModelConfig,
    build_small_model,
    save_diffusion_model,
    write_pointer,
)
from pipeline.errors import run_stage
from pipeline.params import from_dict, load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/model_init")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    params = load_params(args.params)
    model = params["model"]
    if model["source"] == "build":
        cfg = from_dict(SmallModelConfig, model.get("small", {}))
        fp = save_diffusion_model(build_small_model(cfg, seed=int(params.get("seed", 0))), args.out)
        what = "small model (random init)"
    else:
        # Later stages load the pointer folder like a model folder and recheck the fingerprint.
        fp = write_pointer(model["source"], args.out)
        what = f"pointer to {model['source']}"
    print(
        f"build_model: {what} -> {args.out} (fingerprint {fp}), {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    run_stage("build_model", main)
