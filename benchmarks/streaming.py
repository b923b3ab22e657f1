"""Streaming vs preloaded train and evaluate: peak RSS as the dataset grows 10x, and throughput.

Runs the real stages (stages/train.py, stages/evaluate.py) on projects of the default's size and
`--scale` times it (benchmarks/default_size_project.py: real stores at the default's tap
shapes, 800 images at 1x), once streaming from the store (loader.memory_budget_mb 0) and once
preloaded (a budget larger than the split). Peak RSS is the stage process's (and its DataLoader
workers', the larger); throughput is train's seconds per iteration and evaluate's wall time.

Usage: python benchmarks/streaming.py [--scale 10] [--iterations 60] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from default_size_project import make_project  # this script's folder is on sys.path
from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
STAGES = {
    "train": ["data/encoded", "data/features", "data/heads", "metrics/train.json", "plots/train"],
    "evaluate": [
        "data/encoded",
        "data/features",
        "data/heads",
        "metrics/evaluate.json",
        "plots/evaluate",
        "data/predictions",
    ],
}
# Runs a stage in-process, then prints the peak RSS (MiB) of it and of its DataLoader workers.
# The stage's own is VmHWM (pipeline.core.device.peak_rss_mb): ru_maxrss survives fork + exec,
# so it reported this benchmark's own RSS (1 GB after making the 10x project) as the stage's.
WRAPPER = """
import json, os, resource, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
from pipeline.core.device import peak_rss_mb
print(json.dumps({"self": peak_rss_mb(),
                  "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
sys.exit(code)
"""


def run_stage(root: Path, name: str) -> dict:
    args = [
        sys.executable,
        "-c",
        WRAPPER,
        str(ROOT / "stages" / f"{name}.py"),
        *STAGES[name],
        "--params",
        "params.yaml",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        args,
        cwd=root,
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"},
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name}: {proc.stderr[-3000:]}")
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    how = [line for line in proc.stdout.splitlines() if "preloading" in line or "streaming" in line]
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(max(rss.values())),
        "stage_rss_mb": round(rss["self"]),
        "loader": how,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--timesteps", type=int, nargs="+", default=[50, 150])
    args = ap.parse_args()
    out: dict = {"machine": machine_info(), "settings": vars(args), "runs": []}
    for scale in (1, args.scale):
        root = Path(tempfile.mkdtemp(prefix=f"streaming-{scale}x-"))
        n = make_project(root, args.timesteps, scale=scale)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"].update(
            iterations=args.iterations,
            eval_interval=0,
            checkpoint_interval=args.iterations,
            device="cpu",
        )
        params["evaluate"].update(overlays=0, device="cpu")
        modes = [("stream", 0, w) for w in args.workers] + [("preload", 10**6, 0)]
        for mode, budget, workers in modes:
            params["loader"].update(memory_budget_mb=budget, workers=workers)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            row = {"scale": scale, "images": n, "mode": mode, "workers": workers}
            for name in STAGES:
                row[name] = run_stage(root, name)
            metrics = json.loads((root / "metrics" / "train.json").read_text())
            row["train"]["s_per_iteration"] = metrics["seconds_per_iteration"]
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(root)
    base = {(r["mode"], r["workers"]): r for r in out["runs"] if r["scale"] == 1}
    out["rss_growth_1x_to_scale"] = {
        f"{r['mode']}_w{r['workers']}": {
            s: round(r[s]["peak_rss_mb"] / base[(r["mode"], r["workers"])][s]["peak_rss_mb"], 2)
            for s in STAGES
        }
        for r in out["runs"]
        if r["scale"] == args.scale
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
