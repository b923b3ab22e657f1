"""The pretraining-compute figure: target mIoU against UNet pretraining steps, from the committed
export of the experiments (experiments/results.json, experiments/run.py).

Writes plots/scaling/scaling.csv (one row per experiment; `dvc plots show` draws it, see
dvc.yaml) and docs/scaling.png: (a) diffusion pretraining by steps, (d) the same UNet
pretrained as a masked autoencoder, the twice-as-wide UNet at the default's wall time, and (b)
random init and (c) the pixel CNN as flat references.

Usage: python docs/scaling.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "experiments" / "results.json"
# experiment -> (row, UNet pretraining steps)
RUNS = {
    "unet-random": ("a", 0),
    "default": ("a", 500),
    "pretrain-1500": ("a", 1500),
    "masked-500": ("d", 500),
    "masked-1500": ("d", 1500),
    "wider": ("w", 238),
    "random-init": ("b", 0),
    "pixels": ("c", None),
}
ROWS = {
    "a": "(a) diffusion pretraining",
    "d": "(d) masked-autoencoder pretraining",
    "w": "(a) 2x wider UNet, the default's wall time",
    "b": "(b) random init",
    "c": "(c) pixel CNN",
}


def rows() -> list[dict]:
    """One row per experiment: mIoU per domain, the targets' mean, pretraining seconds."""
    exps = json.loads(EXPORT.read_text())["experiments"]
    out = []
    for name, (row, steps) in RUNS.items():
        if name not in exps:
            continue  # not run yet: the README's table names it, the figure leaves it out
        m = exps[name]["metrics"]
        scores = {d: s["mIoU"] for d, s in m["scores"].items()}
        targets = sorted(d for d in scores if d != "game")
        out.append(
            {
                "experiment": name,
                "row": row,
                "pretrain_steps": steps,
                **scores,
                "target_mean": round(sum(scores[d] for d in targets) / len(targets), 2),
                "pretrain_s": (m["pretrain"].get("seconds") or {}).get("total"),
            }
        )
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    table = rows()
    targets = sorted(
        k
        for k in table[0]
        if k not in ("experiment", "row", "pretrain_steps", "target_mean", "pretrain_s", "game")
    )
    csv = ROOT / "plots" / "scaling" / "scaling.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    cols = ["experiment", "row", "pretrain_steps", "game", *targets, "target_mean"]
    csv.write_text(
        "\n".join([",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in table])
        + "\n"
    )
    fig = Figure(figsize=(3.2 * (len(targets) + 1), 3.0))
    axes = fig.subplots(1, len(targets) + 1, sharex=True)
    for ax, what in zip(axes, [*targets, "target_mean"], strict=True):
        for row, style in (("a", "o-"), ("d", "s--"), ("w", "k^")):
            pts = sorted((r["pretrain_steps"], r[what]) for r in table if r["row"] == row)
            if pts:
                ax.plot([max(s, 1) for s, _ in pts], [v for _, v in pts], style, label=ROWS[row])
        for row, color in (("b", "grey"), ("c", "tab:red")):
            ref = [r[what] for r in table if r["row"] == row]
            if ref:
                ax.axhline(ref[0], color=color, ls=":", label=ROWS[row])
        ax.set_xscale("log")
        ax.set_title("mean of the targets" if what == "target_mean" else what, fontsize=9)
        ax.set_xlabel("UNet pretraining steps (0 drawn at 1)", fontsize=8)
    axes[0].set_ylabel("mIoU (%)")
    axes[-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "scaling.png", dpi=110)
    print(f"wrote {csv} and docs/scaling.png ({len(table)} experiments)")


if __name__ == "__main__":
    main()
