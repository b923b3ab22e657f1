"""The pretraining-compute scaling figure: target mIoU against UNet pretraining steps.

Reads the named DVC experiments (`dvc exp show --json`, all commits) that the README's
"Pretraining compute" section queues (s500 is the committed default in the workspace), and
writes
- plots/scaling/scaling.csv (one row per experiment; `dvc plots show` draws it, see dvc.yaml),
- docs/scaling.png (each target and their mean: (a) the diffusion-pretrained features by steps,
  (d) the masked-autoencoder pretraining of the same UNet, (b) random init and (c) the pixel
  CNN as flat references),
- benchmarks/results/scaling.json (the table, with the machine).

Usage: python benchmarks/scaling.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from machine import machine_info  # this script's folder is on sys.path
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
# name -> (row, pretraining steps): the experiments of the README's scaling section.
RUNS = {
    "s0": ("a", 0),
    "s500": ("a", 500),
    "s1500": ("a", 1500),
    "s5000": ("a", 5000),
    "mae500": ("d", 500),
    "mae1500": ("d", 1500),
    "rand": ("b", 0),
    "pix": ("c", None),
}
ROWS = {
    "a": "(a) diffusion pretraining",
    "d": "(d) masked-autoencoder pretraining",
    "b": "(b) random init",
    "c": "(c) pixel CNN",
}
# Off the curve, in the table: 2x encoding resolution, fresh pretraining scenes, the benchmark.
OTHERS = {"res2x": ("a", 500), "fresh500": ("a", 500), "benchmark": ("a", 5000)}


def experiments() -> dict[str, dict]:
    """{experiment name: {"mIoU": {domain: value}, "pretrain_s": s, "train_s": s}}."""
    out = subprocess.run(
        ["dvc", "exp", "show", "-A", "--json"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    # Queued and running experiments show their baseline's metrics: only finished ones count.
    done = subprocess.run(
        ["dvc", "exp", "list", "-A", "--name-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found: dict[str, dict] = {}
    for rev in json.loads(out):
        for exp in rev.get("experiments") or []:
            for run in exp.get("revs", []):
                name = exp.get("name") or run.get("name")
                metrics = (run.get("data") or {}).get("metrics") or {}
                scores = metrics.get("metrics/evaluate.json", {}).get("data")
                if name in RUNS | OTHERS and name in done and scores:
                    pre = metrics.get("metrics/pretrain.json", {}).get("data", {})
                    train = metrics.get("metrics/train.json", {}).get("data", {})
                    found[name] = {
                        "mIoU": {d: round(s["mIoU"], 2) for d, s in scores.items()},
                        "pretrain_s": (pre.get("seconds") or {}).get("total"),
                        "train_s": train.get("seconds"),
                    }
    # s500 is the default itself: the committed `dvc repro` in the workspace.
    metrics = {
        n: json.loads((ROOT / "metrics" / f"{n}.json").read_text())
        for n in ("evaluate", "pretrain", "train")
    }
    if metrics["pretrain"].get("steps") == 500 and "s500" not in found:
        found["s500"] = {
            "mIoU": {d: round(s["mIoU"], 2) for d, s in metrics["evaluate"].items()},
            "pretrain_s": metrics["pretrain"]["seconds"]["total"],
            "train_s": metrics["train"]["seconds"],
        }
    return found


def main() -> None:
    runs = experiments()
    missing = sorted(set(RUNS) - set(runs))
    targets = sorted({d for r in runs.values() for d in r["mIoU"]} - {"game"})
    rows = []
    for name, (row, steps) in (RUNS | OTHERS).items():
        if name not in runs:
            continue
        m = runs[name]["mIoU"]
        mean = round(sum(m[d] for d in targets) / len(targets), 2)
        rows.append(
            {
                "experiment": name,
                "row": row,
                "pretrain_steps": steps,
                **m,
                "target_mean": mean,
                "pretrain_s": runs[name]["pretrain_s"],
                "train_s": runs[name]["train_s"],
            }
        )
    csv = ROOT / "plots" / "scaling" / "scaling.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    cols = ["experiment", "row", "pretrain_steps", "game", *targets, "target_mean"]
    csv.write_text(
        "\n".join([",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows])
        + "\n"
    )
    fig = Figure(figsize=(3.2 * (len(targets) + 1), 3.0))
    axes = fig.subplots(1, len(targets) + 1, sharex=True)
    for ax, what in zip(axes, [*targets, "target_mean"], strict=True):
        for row, style in (("a", "o-"), ("d", "s--")):
            pts = sorted(
                (r["pretrain_steps"], r[what])
                for r in rows
                if r["row"] == row and r["experiment"] in RUNS
            )
            if pts:
                ax.plot([max(s, 1) for s, _ in pts], [v for _, v in pts], style, label=ROWS[row])
        for r in rows:
            if r["experiment"] == "benchmark":
                ax.plot(r["pretrain_steps"], r[what], "k*", ms=9, label="benchmark recipe")
        for row, color in (("b", "grey"), ("c", "tab:red")):
            ref = [r[what] for r in rows if r["row"] == row]
            if ref:
                ax.axhline(ref[0], color=color, ls=":", label=ROWS[row])
        ax.set_xscale("log")
        ax.set_title("mean of the targets" if what == "target_mean" else what, fontsize=9)
        ax.set_xlabel("UNet pretraining steps (0 drawn at 1)", fontsize=8)
    axes[0].set_ylabel("mIoU (%)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "scaling.png", dpi=110)
    result = {"machine": machine_info(), "rows": rows, "missing": missing}
    (ROOT / "benchmarks" / "results" / "scaling.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
