"""End-to-end timing of the default pipeline from a fresh clone, and peak RSS of each stage.

Usage: python benchmarks/pipeline_timing.py [--out benchmarks/results/pipeline_timing.json]
Clones this repository into a temporary folder, runs each stage of the default `dvc repro` in
order (timing it and recording its peak RSS), then a no-op `dvc repro`, then `dvc exp run`
adding one timestep.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.reporting.machine import Run

ROOT = Path(__file__).resolve().parents[1]
# Run a command and report the peak RSS of its largest descendant (ru_maxrss, KiB on Linux).
PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r.returncode)"
)


def timed(args: list[str], cwd: Path) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, *args], cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out[-4000:]}")
    peak = int(re.search(r"PEAK_KIB (\d+)", out).group(1))
    return wall, peak, out


def stage_order(cwd: Path) -> list[str]:
    """The stages of dvc.yaml in file order (topological there), foreach expanded from params."""
    stages = yaml.safe_load((cwd / "dvc.yaml").read_text())["stages"]
    timesteps = yaml.safe_load((cwd / "params.yaml").read_text())["timesteps"]
    order: list[str] = []
    for name, spec in stages.items():
        order += [f"{name}@{t}" for t in timesteps] if "foreach" in spec else [name]
    return order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/pipeline_timing.json"))
    ap.add_argument("--new-timestep", type=int, default=300)
    args = ap.parse_args()
    run = Run()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        stages = {}
        total = 0.0
        for stage in stage_order(clone):
            wall, peak, _ = timed(["dvc", "repro", "--single-item", stage], clone)
            stages[stage] = {"wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024, 1)}
            total += wall
            print(f"{stage}: {wall:.1f} s, peak {peak / 1024:.0f} MiB", flush=True)
        noop, _, _ = timed(["dvc", "repro"], clone)
        subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
        subprocess.run(["git", "commit", "-qm", "run"], cwd=clone, check=True)
        params = (clone / "params.yaml").read_text()
        old = re.search(r"timesteps: \[([^\]]*)\]", params).group(1)
        new = f"[{old}, {args.new_timestep}]"
        exp, _, exp_out = timed(["dvc", "exp", "run", "-S", f"timesteps={new}"], clone)
        result = {
            "stages": stages,
            "repro_total_s": round(total, 1),
            "noop_repro_s": round(noop, 1),
            "exp_run_add_timestep_s": round(exp, 1),
            "exp_run_stages": re.findall(r"Running stage '([^']+)'", exp_out),
        }
    print(json.dumps(run.write(args.out, result), indent=2))


if __name__ == "__main__":
    main()
