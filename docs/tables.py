"""Rebuild every table of README.md and docs/*.md from the committed results: the benchmarks'
(benchmarks/results/*.json) and the experiments' export (experiments/results.json).

    python docs/tables.py           # rewrite the tables between the pages' markers
    python docs/tables.py --check   # exit 1 if a table differs from its results file

A table sits between `<!-- table:NAME -->` and `<!-- /table -->`, a figure quoted in prose
between `<!-- value:NAME -->` and `<!-- /value -->`; NAME is a function below (TABLES, VALUES),
which reads only committed files (the experiments' export, the benchmarks' results). The test
suite runs --check, so no figure of the README or docs/ can drift from the file it comes from.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXPERIMENTS = ROOT / "experiments" / "results.json"


def pages() -> list[Path]:
    """The pages whose tables this script builds: the README, then docs/ by name."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


DOMAINS = ["game", "real", "fog", "night", "rain"]
TARGETS = DOMAINS[1:]


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _exps() -> dict:
    return json.loads(EXPERIMENTS.read_text())["experiments"]


def _not_run(label: str, name: str, cells: int) -> list[str]:
    """A row for an experiment the export does not hold yet: visible, never silently left out."""
    return [f"{label} — *not run on this code yet* (`python experiments/run.py queue {name}`)"] + [
        "–"
    ] * cells


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _miou(exp: dict) -> list[str]:
    return [_f(exp["metrics"]["scores"][d]["mIoU"]) for d in DOMAINS]


def _mean(exp: dict) -> float:
    s = exp["metrics"]["scores"]
    return sum(s[d]["mIoU"] for d in TARGETS) / len(TARGETS)


def _overrides(exp: dict) -> str:
    return " ".join(f"`{o}`" for o in exp["overrides"]) or "(none)"


def default_results() -> str:
    """The default's scores, tuned, and the two baselines."""
    e = _exps()
    d = e["default"]
    tuned = d["metrics"]["tuned"]
    rows = [
        [
            "(a) small SD-family model pretrained here, DIFF taps, t = 50, 150 (the default)",
            *_miou(d),
            _f(_mean(d), 2),
        ],
        [
            "(a) + test-time prompt tuning (10 steps, 8 unlabeled images; 40 scored)",
            "–",
            *[_f(tuned[t]["after"]) for t in TARGETS],
            "–",
        ],
        [
            "(a) the same 40 images before tuning",
            "–",
            *[_f(tuned[t]["before"]) for t in TARGETS],
            "–",
        ],
    ]
    for name, label in (
        ("random-init", "(b) same architecture, random init"),
        ("pixels", "(c) CNN trained from pixels, from scratch"),
    ):
        if name not in e:
            rows.append(_not_run(label, name, 6))
            continue
        rows.append([f"{label} {_overrides(e[name])}", *_miou(e[name]), _f(_mean(e[name]), 2)])
    return _table(["features", *DOMAINS, "targets mean"], rows)


SEEDS = {
    "default": "`train.seed=0` (the default)",
    "train-seed-1": "`train.seed=1`",
    "train-seed-2": "`train.seed=2`",
    "train-seed-3": "`train.seed=3`",
}


def seed_spread() -> str:
    """The default at several `train.seed`: per domain, each run and the runs' range."""
    e = _exps()
    rows, runs = [], []
    for name, label in SEEDS.items():
        if name not in e:
            rows.append(_not_run(label, name, 6))
            continue
        runs.append(e[name])
        rows.append([label, *_miou(e[name]), _f(_mean(e[name]), 2)])
    if len(runs) > 1:
        cols = [[x["metrics"]["scores"][d]["mIoU"] for x in runs] for d in DOMAINS]
        means = [_mean(x) for x in runs]
        rows.append(
            [
                f"range over the {len(runs)} runs (max - min)",
                *[_f(max(c) - min(c)) for c in cols],
                _f(max(means) - min(means), 2),
            ]
        )
    return _table(["head seed", *DOMAINS, "targets mean"], rows)


def crop_draws() -> str:
    """Whole frames, crops cut in feature space, crop draws K = 1, 2, 4."""
    e = _exps()
    names = {
        "default": "whole 128x256 frames (the default)",
        "crop-feature": "crops of 64x128 cut in feature space of whole-frame features",
        "crop-draws-k1": "crop draws, K = 1",
        "crop-draws-k2": "crop draws, K = 2",
        "crop-draws-k4": "crop draws, K = 4",
    }
    rows = []
    for name, label in names.items():
        if name not in e:
            rows.append(_not_run(label, name, 10))
            continue
        m = e[name]["metrics"]
        extract = m["extract"]
        rows.append(
            [
                f"{label} {_overrides(e[name]) if e[name]['overrides'] else ''}".strip(),
                *_miou(e[name]),
                _f(sum(x["MB"] for x in extract.values()), 0),
                _f(m["encode"]["seconds"]),
                _f(m["invert"]["seconds"]),
                _f(sum(x["seconds"] for x in extract.values())),
                _f(m["train"]["seconds"]),
            ]
        )
    return _table(
        ["samples", *DOMAINS, "stores MB", "encode s", "invert s", "extract s", "train s"], rows
    )


def storage_modes() -> str:
    e = _exps()
    rows = []
    for name, mode in (
        ("default", "fp16"),
        ("int8", "int8"),
        ("pca-8", "pca-8"),
        ("pca-8-int8", "pca-8-int8"),
    ):
        if name not in e:
            rows.append(_not_run(f"`{mode}`", name, 7))
            continue
        m = e[name]["metrics"]
        mb = m["extract"]["t50"]["MB"]
        rows.append([f"`{mode}`", _f(mb, 0), *_miou(e[name]), _f(_mean(e[name]), 2)])
    return _table(
        ["`extract.storage`", "store MB (t50, 800 images)", *DOMAINS, "targets mean"], rows
    )


def scaling() -> str:
    e = _exps()
    labels = {
        "random-init": "(b) random init: VAE and UNet",
        "unet-random": "(a) VAE trained, UNet random (0 UNet steps)",
        "default": "(a) 500 UNet steps (the default)",
        "pretrain-1500": "(a) 1500 steps",
        "wider": "(a) UNet 2x wider, 238 steps (the default's wall time)",
        "masked-500": "(d) masked autoencoder, the same UNet, 500 steps, read at t = 0",
        "masked-1500": "(d) masked autoencoder, 1500 steps",
        "pixels": "(c) pixel CNN from scratch",
    }
    rows = []
    for name, label in labels.items():
        if name not in e:
            rows.append(_not_run(label, name, 7))
            continue
        # The UNet's share: the VAE's (the same 150 steps but in (b)) only adds load noise.
        pre = (e[name]["metrics"]["pretrain"].get("seconds") or {}).get("unet", 0)
        over = _overrides(e[name]) if e[name]["overrides"] else ""
        rows.append(
            [
                f"{label} {over}".strip(),
                *_miou(e[name]),
                _f(_mean(e[name]), 2),
                _f(pre, 0) if name != "pixels" else "–",
            ]
        )
    return _table(["experiment", *DOMAINS, "targets mean", "UNet pretraining s"], rows)


def cost() -> str:
    c = _load("cost")
    labels = {
        "T1": "T = 1, plain",
        "T9": "T = 9, plain",
        "T9_guided": "T = 9, plain + DIFF's guided view",
        "diff_inversion_every_iteration": "DIFF's iteration: its inversion (plain and guided) "
        "every iteration, features at 9 t",
    }
    rows = []
    for name, label in labels.items():
        r = c["measured"][name]
        on, ca = r["online"], r["cached"]
        rows.append(
            [
                label,
                f"{on['median_s']:.2f} ({on['min_s']:.2f}-{on['max_s']:.2f})",
                f"{ca['median_s']:.3f} ({ca['min_s']:.3f}-{ca['max_s']:.3f})",
                f"{ca['read_median_s']:.3f}",
                f"{r['ratio_of_medians']:.1f}x",
                str(r["unet_passes_per_iteration"]),
            ]
        )
    return _table(
        [
            "one training iteration",
            "online s, median (min-max)",
            "from the cache s",
            "of which the read s (random rows of 64; page cache dropped before each round)",
            "online / cached",
            "UNet passes",
        ],
        rows,
    )


def cost_sweep() -> str:
    c = _load("cost")
    sweep = c["sweep_8_experiments_from_measured"]
    rows = []
    for name in ("T1", "T9", "T9_guided", "diff_inversion_every_iteration"):
        for it in ("40k", "4k"):
            r = sweep[name][f"{it}_iterations"]
            rows.append(
                [
                    name,
                    it,
                    _f(r["online_hours"]),
                    _f(r["cached_hours"]),
                    f"{r['online_over_cached']:.1f}x",
                    f"{sweep[name]['break_even_head_iterations']:,}",
                ]
            )
    return _table(
        [
            "setting",
            "iterations",
            "8 online trainings, h",
            "1 extraction + 8 cached, h",
            "saved",
            "break-even: head iterations, all experiments",
        ],
        rows,
        right_from=2,
    )


def pca_head() -> str:
    h = _load("pca_head")["head_step"]
    rows = [
        [
            {
                "coefficients": "the 64 coefficients per tap (what train does)",
                "reconstructed": "each tap reconstructed to its full width first",
            }[k],
            f"{h[k]['input_channels']:,}",
            f"{h[k]['median_ms']:.0f} ({h[k]['min_ms']:.0f}-{h[k]['max_ms']:.0f})",
        ]
        for k in ("coefficients", "reconstructed")
    ]
    return _table(
        ["the head's step on a PCA store", "input channels", "ms, median (min-max)"], rows
    )


def cost_derived() -> str:
    d = _load("cost")["derived_h100_512x512"]
    rows = [
        [
            name,
            f"{d[name]['online_s']:.3f}",
            f"{d[name]['cached_s']:.4f}",
            f"{d[name]['online_over_cached']:.0f}x",
        ]
        for name in ("T1", "T9", "T9_guided", "diff_inversion_every_iteration")
    ]
    return _table(
        ["setting (DERIVED from FLOPs, not measured)", "online s", "cached s", "online / cached"],
        rows,
    )


def loader() -> str:
    s = _load("store_io")

    def cell(r: dict) -> str:
        lo, hi = r["ratio_min_max"]
        return f"{r['ratio_to_raw']:.2f} ({lo:.2f}-{hi:.2f})"

    rows = []
    for label, store in (
        ("default's chunks, 4-100 KB (fp16, crc32c)", s["default"]["fp16-none"]),
        ("SD-2.1's chunks at 1024x512, 1-10 MB", s["sd21"]["fp16-none"]),
    ):
        cold = store["read"]["cold"]
        # The thread sweep's entry that is the loader itself, read again in the same rounds:
        # the rounds' noise. Samples under the reader's PARALLEL_MIN_BYTES (1 MiB) read on one
        # thread whatever the setting (this file reads results only, not the pipeline).
        small = store["MB_per_sample"] * 1e6 < 1 << 20
        threads = 1 if small else store["default_read_threads"]
        rows.append(
            [
                label,
                _f(cold["raw"]["MB_per_s"], 0),
                cell(cold["loader"]),
                cell(cold[f"loader_t{threads}"]),
                cell(cold["loader_random_order"]),
                cell(cold["per_chunk_read"]),
                cell(store["read"]["hot"]["loader"]),
            ]
        )
    return _table(
        [
            "store",
            "raw cold MB/s",
            "loader / raw, cold, rows in order",
            "the same loader again",
            "cold, random order",
            "cold, one read per tap",
            "hot, in order",
        ],
        rows,
    )


def loader_recipe() -> str:
    r = _load("store_io")["diff_recipe"]
    rows = [
        [
            f"`{mode}`",
            _f(m["MB_per_sample_9_timesteps"]),
            _f(m["samples_per_s_cold_in_order"], 2),
            _f(m["samples_per_s_cold_random_order"], 2),
            _f(m["derived_h100_needs_MB_per_s"] / 1000, 1),
        ]
        for mode, m in r["modes"].items()
    ]
    return _table(
        [
            "storage",
            "MB per sample (9 t)",
            "samples/s cold, in order",
            "random order",
            "GB/s an H100 would need (derived)",
        ],
        rows,
    )


def rehearsal() -> str:
    r = _load("rehearsal")
    rows = [
        [name, f"{s['wall_s']:.0f} s", f"{s['peak_rss_gib']:.2f} GiB"]
        for name, s in r["stages"].items()
    ]
    rows.append(
        ["**total**, with a no-op `dvc repro` after", f"**{r['total_s'] / 60:.1f} min**", ""]
    )
    return _table(["stage", "wall", "peak RSS"], rows)


def rehearsal_crops() -> str:
    c = _load("rehearsal")["checks"]["crop_stores"]
    rows = [
        [
            f"rehearsal ({c['resolution'][0]}x{c['resolution'][1]} crops)",
            f"{c['stride8_map'][0]}x{c['stride8_map'][1]}",
            _f(c["bytes_per_draw_per_timestep"] / 1e6, 2),
            _f(c["bytes_per_draw_all_timesteps"] / 1e6, 1),
        ],
        [
            "DIFF's 512x512 crops",
            "64x64",
            _f(c["at_512x512"]["bytes_per_draw_per_timestep"] / 1e6, 1),
            _f(c["at_512x512"]["bytes_per_draw_all_timesteps"] / 1e6, 0),
        ],
    ]
    return _table(
        [
            "crop draws",
            "stride-8 map",
            "MB per draw and timestep (fp16)",
            "MB per draw, 9 timesteps",
        ],
        rows,
    )


def gta_budget() -> str:
    """DIFF's recipe at GTA scale per storage mode (benchmarks/budget.py: the plan's figures)."""
    b = _load("budget")
    rows = []
    for mode, m in b["modes"].items():
        rows.append(
            [
                f"`{mode}`" + (" (the recipe's)" if mode == "pca-64-int8" else ""),
                _f(m["features_TB"], 2),
                _f(m["total_TB"], 2),
                f"{_f(m['dvc_cache_extra_TB']['copy'], 2)} / 0",
                _f(m["dvc_hashing_hours_here"], 1),
            ]
        )
    return _table(
        [
            "extract.storage",
            "stores TB",
            "all outputs TB (+ trajectories, latents)",
            "DVC cache extra TB: copy / hardlink, reflink",
            "DVC md5 hours (this VM)",
        ],
        rows,
    )


def gta_passes() -> str:
    """UNet passes and GPU-hours of DIFF's recipe at GTA scale (the same for every mode)."""
    b, before = _load("budget"), _load("passes")["per_draw"]["before"]["unet_passes"]
    per = b["unet_passes_per_crop_draw"]
    m = next(iter(b["modes"].values()))
    row = [
        f"{per['invert']:.0f} + {per['extract@t x 9']:.0f} = "
        f"{per['invert'] + per['extract@t x 9']:.0f} (was {before})",
        f"{m['unet_passes'] / 1e6:.2f} M",
        _f(m["gpu_hours_derived"], 1),
        _f(m["gpu_hours_at_diffs_a6000_rate"], 0),
    ]
    return _table(
        [
            "UNet passes per crop draw (invert + extract)",
            "all passes",
            "GPU-hours, derived (H100, 40 % of bf16 peak)",
            "GPU-hours at DIFF's A6000 rate (its log)",
        ],
        [row],
        right_from=0,
    )


def passes() -> str:
    """Seconds per crop draw of DIFF's recipe before and after the pass cuts (passes.py)."""
    p = _load("passes")
    rows = [
        [
            {"before": 'before: every step, "" run twice', "after": "after (the code)"}[k],
            str(r["unet_passes"]),
            f"{r['median_s']:.1f} ({r['min_s']:.1f}-{r['max_s']:.1f})",
        ]
        for k, r in p["per_draw"].items()
        if k in ("before", "after")
    ]
    return _table(["one crop draw, invert + extract", "UNet passes", "s, median (min-max)"], rows)


# ---- prompting (Gong et al., DIFF's guided view) and CleanDIFT: one pretraining, one machine --

SCENE = ["prompt-scene", "prompt-scene-seed-1", "prompt-scene-seed-2"]


def _same_pretraining(e: dict, names: list[str]) -> None:
    """The rows of one table come from one pretraining (pretraining differs across machines)."""
    prints = {e[n]["metrics"]["pretrain"]["fingerprint"] for n in names if n in e}
    if len(prints) > 1:
        raise SystemExit(f"tables: error: rows {names} come from pretrainings {sorted(prints)}")


def _scene_range(e: dict) -> float | None:
    means = [_mean(e[n]) for n in SCENE if n in e]
    return max(means) - min(means) if len(means) > 1 else None


PROMPTING = {
    "prompt-plain": (
        'plain "" prompt',
        "Gong et al.: the scene prompt beats the empty prompt across domains",
    ),
    "prompt-scene": ("scene prompt (the default)", "the baseline of this table"),
    "prompt-random": (
        "randomized over the scene and its 4 condition prompts, no consistency",
        "Gong et al.: randomization alone helps less than with the consistency loss",
    ),
    "prompt-random-consistency": (
        "randomized + consistency loss (KL, weight 1)",
        "Gong et al.: randomization with consistency generalizes best of their training variants",
    ),
    "diff-guided": (
        'DIFF: plain "" + guided class-prompt view, CE on both + MSE of logits',
        "DIFF: the guided view's consistency improves generalization",
    ),
}


def prompting() -> str:
    """Gong et al.'s prompts and DIFF's guided view against the scene prompt's seed range."""
    e = _exps()
    _same_pretraining(e, [*PROMPTING, *SCENE])
    spread = _scene_range(e)
    scene = [_mean(e[n]) for n in SCENE if n in e]
    base = sum(scene) / len(scene) if scene else None  # the scene prompt over its head seeds
    rows = []
    for name, (label, claim) in PROMPTING.items():
        if name not in e:
            rows.append(_not_run(label, name, 11))
            continue
        seeds = [n for n in (name, f"{name}-seed-1", f"{name}-seed-2") if n in e]
        means = [_mean(e[n]) for n in seeds]
        # Means over head seeds on both sides: a single seed's difference can flip its sign.
        delta = None if base is None or name == "prompt-scene" else sum(means) / len(means) - base
        if delta is None or spread is None:
            verdict = "–"
        elif abs(delta) > 2 * spread:
            verdict = "beyond 2x the seed range: " + ("a gain" if delta > 0 else "a loss")
        else:
            verdict = "within 2x the seed range: no effect shown"
        rows.append(
            [
                label,
                *_miou(e[name]),
                _f(_mean(e[name]), 2),
                f"{_f(sum(means) / len(means), 2)} ({len(means)})",
                "–" if delta is None else f"{delta:+.2f}",
                claim,
                verdict,
                f"`{e[name]['command']}`",
            ]
        )
    runs = len([n for n in SCENE if n in e])
    rows.append(
        [f"head seed range of the scene prompt ({runs} seeds)", *["–"] * 5, _f(spread, 2)]
        + ["–"] * 5
    )
    return _table(
        [
            "prompts",
            *DOMAINS,
            "targets mean",
            "mean over head seeds (runs)",
            "vs scene (seed means)",
            "the paper's claim",
            "here",
            "queue command",
        ],
        rows,
    )


TUNING = {
    ("prompt-scene", "tune-seed-1"): "10 steps, 8 images (the default)",
    ("tune-50-steps-32-images", "tune-50-steps-32-images-seed-1"): "50 steps, 32 images",
}


def tuning() -> str:
    """Test-time prompt tuning per target: before, after with two tuning seeds, their spread."""
    e = _exps()
    _same_pretraining(e, [n for pair in TUNING for n in pair])
    rows = []
    for (a, b), label in TUNING.items():
        if a not in e or b not in e:
            rows.append(_not_run(label, a if a not in e else b, 6))
            continue
        ta, tb = e[a]["metrics"]["tuned"], e[b]["metrics"]["tuned"]
        for t in TARGETS:
            before = ta[t]["before"]
            after = [ta[t]["after"], tb[t]["after"]]
            gain = sum(after) / 2 - before
            spread = max(after) - min(after)
            rows.append(
                [
                    f"{label}: {t}",
                    _f(before),
                    _f(after[0]),
                    _f(after[1]),
                    f"{gain:+.2f}",
                    _f(spread, 2),
                    "yes" if abs(gain) > max(spread, 0.1) else "no",
                ]
            )
    return _table(
        [
            "tuning (40 scored images per target)",
            "before",
            "after, seed 0",
            "after, seed 1",
            "mean change",
            "spread of the 2 seeds",
            "beyond the spread",
        ],
        rows,
    )


CLEAN = {
    "prompt-scene": "noisy latents at t = 50 and 150 (the default)",
    "clean-pretrained": "the clean latent at t = 261, the UNet as pretrained",
    "cleandift": "the clean latent at t = 261, after the cleandift stage (300 steps)",
}


def clean_features() -> str:
    """Noisy timesteps against one clean pass, before and after CleanDIFT's fine-tuning."""
    e = _exps()
    _same_pretraining(e, [*CLEAN, *SCENE])
    spread = _scene_range(e)
    rows = []
    for name, label in CLEAN.items():
        if name not in e:
            rows.append(_not_run(label, name, 13))
            continue
        m = e[name]["metrics"]
        extract = m["extract"]
        stage = m.get("cleandift") or {}
        rows.append(
            [
                label,
                *_miou(e[name]),
                _f(_mean(e[name]), 2),
                _f(spread, 2),
                _f(sum(x["MB"] for x in extract.values()), 0),
                _f(sum(x["seconds"] for x in extract.values())),
                str(len(extract)),
                f"{stage['seconds']:.0f} s, {stage['unet_passes']:,} passes"
                if stage.get("steps")
                else "–",
                f"`{e[name]['command']}`",
            ]
        )
    return _table(
        [
            "features read from",
            *DOMAINS,
            "targets mean",
            "head seed range",
            "stores MB",
            "extract s",
            "UNet passes per image",
            "cleandift stage",
            "queue command",
        ],
        rows,
    )


def rehearsal_clean() -> str:
    """The clean recipe's rehearsal beside DIFF's: passes and MB per crop draw."""
    header = [
        "recipe",
        "UNet passes per GTA5 draw (plain + guided view, the plan)",
        "stores",
        "MB per draw at 512x512 (fp16, full width)",
        "rehearsal on SD-2.1's architecture (CPU)",
    ]
    path = RESULTS / "rehearsal-cleandift.json"
    if not path.exists():
        return _table(
            header, [["`cleandift-gta2cs` — *not run yet* (`make rehearsal-clean`)"] + ["–"] * 4]
        )
    clean = json.loads(path.read_text())
    rows = []
    for name, r in (("diff-gta2cs", _load("rehearsal")), ("cleandift-gta2cs", clean)):
        c = r["checks"]["crop_stores"]
        passes = clean["passes_per_draw"][name]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in passes.items() if k != "all")
        stores = c["bytes_per_draw_all_timesteps"] // c["bytes_per_draw_per_timestep"]
        rows.append(
            [
                f"`{name}`",
                f"{passes['all']:.0f} ({stages})",
                f"{stores} timestep(s)",
                _f(c["at_512x512"]["bytes_per_draw_all_timesteps"] / 1e6, 0),
                f"{r['total_s'] / 60:.1f} min; DIFF's taps and widths per timestep: "
                + ("yes" if r["checks"]["matches_diff"] else "no"),
            ]
        )
    return _table(header, rows)


def _spread(x: dict, digits: int = 1) -> str:
    """A benchmark's median (min-max), or the single value where it ran once ("> x" where the
    benchmark stopped it at x seconds)."""
    if x.get("stopped"):
        return f"> {x['median']:,.{digits}f} (stopped)"
    if x["min"] == x["max"]:
        return f"{x['median']:,.{digits}f}"
    return f"{x['median']:,.{digits}f} ({x['min']:,.{digits}f}-{x['max']:,.{digits}f})"


DVC_COMMANDS = {
    "status": "`dvc status`",
    "repro_noop": "`dvc repro`, nothing to run",
    "exp_run": "`dvc exp run -S train.lr=...` (no store changes): DVC's part",
    "exp_temp": "`dvc exp run --temp ...`: DVC's part (to the first stage)",
    "exp_queue": "`dvc exp run --queue` + `dvc queue start`: DVC's part (to the first stage)",
    "push": "`dvc push` of everything to a fresh local remote",
    "pull_one_t": "`dvc pull extract@91` in a fresh clone (one timestep's stores)",
    "gc": "`dvc gc -w -f`",
}


def dvc_scale() -> str:
    """DVC's bookkeeping at DIFF's recipe's GTA-scale file count, before and after the store
    layout change: the work tree's layout from dvc_scale.json; the layout before it timed where
    dvc_scale_before.json holds it, else only its file count (the plan of its code)."""
    r = _load("dvc_scale")
    before, after = r["layouts"]["before"], r["layouts"]["after"]
    if (RESULTS / "dvc_scale_before.json").exists():
        before = _load("dvc_scale_before")["layouts"]["before"]

    def cell(x: dict | None) -> str:
        if x is None:
            return "not timed"
        first = x.get("to_first_stage")
        return _spread(x["seconds"]) + (
            f" ({_f(first['median'])} to the first stage)" if first else ""
        )

    def ratio(b: float | None, a: float, stopped: bool = False) -> str:
        return "–" if b is None else (">" if stopped else "") + f"{b / a:.0f}x"

    rows = []
    for cmd, label in DVC_COMMANDS.items():
        b, a = before["commands"].get(cmd), after["commands"].get(cmd)
        if a is None:
            continue
        b_s = b["seconds"]["median"] if b else None
        stopped = bool(b and b["seconds"].get("stopped"))
        rows.append([label, cell(b), cell(a), ratio(b_s, a["seconds"]["median"], stopped)])
    first_b = before.get("first_repro_s")
    rows.append(
        [
            "the first `dvc repro` (writing, hashing and caching every file)",
            _f(first_b) if first_b else "not timed",
            _f(after["first_repro_s"]),
            ratio(first_b, after["first_repro_s"]),
        ]
    )
    return _table(
        [
            "DIFF's recipe at GTA scale, seconds",
            f"before: {before['files']:,} files ({before['store_files']:,} in stores)",
            f"after: {after['files']:,} files ({after['store_files']:,} in stores)",
            "before / after",
        ],
        rows,
    )


def dvc_shard_mb() -> str:
    """The shard size against DVC's seconds per command (extract.shard_mb's measured default)."""
    r = _load("dvc_scale")
    # The work tree's layouts (their dvc.yaml reads the digests); no @MB: params.yaml's.
    default = yaml.safe_load((ROOT / "params.yaml").read_text())["extract"]["shard_mb"]
    layouts = sorted(
        (
            {**v, "shard_mb": v["shard_mb"] or default}
            for v in r["layouts"].values()
            if v["stores_dep"].endswith("digests")
        ),
        key=lambda v: v["shard_mb"],
    )
    cmds = ["status", "exp_run", "exp_temp", "exp_queue", "push"]
    rows = [
        [
            f"{v['shard_mb']:,.0f}" + (" (the default)" if v["shard_mb"] == default else ""),
            f"{v['store_files']:,}",
            f"{v['files']:,}",
            *(_f(v["commands"][c]["seconds"]["median"]) for c in cmds if c in v["commands"]),
        ]
        for v in layouts
    ]
    fit = r.get("fit", {})
    rows.append(
        ["per 1,000 files (least squares)", "", ""]
        + [_f(fit[c]["per_1000_files_s"], 2) if c in fit else "–" for c in cmds]
    )
    return _table(["extract.shard_mb", "store files", "all files", *(f"{c} s" for c in cmds)], rows)


def recipe_reads() -> str:
    """Cold random training samples of DIFF's recipe (512x512, both views, 9 timesteps) from
    stores bigger than RAM, against this disk's raw reads of the same sizes."""
    r = _load("recipe_reads")
    labels = {
        "before": "before: a file per tap and array, 16 images a shard",
        "layout": "taps of one shape in one array, 1 GB shards",
        "after": "and views read straight into one buffer (the code)",
    }
    rows = []
    for name, v in r["layouts"].items():
        rows.append(
            [
                labels.get(name, name),
                f"{v['files']:,}",
                f"{v['reads_per_sample']:,.0f}",
                _spread(v["loader_samples_s"], 2),
                _spread(v["raw_samples_s"], 1),
                _spread(v["loader_over_raw"], 2),
            ]
        )
    return _table(
        [
            f"stores: {r['storage']}, {r['images']} crop draws x 9 timesteps "
            f"({next(iter(r['layouts'].values()))['bytes'] / 1e9:.1f} GB, RAM {r['ram_bytes'] / 2**30:.0f} GiB)",
            "files",
            "reads a sample",
            "loader samples/s",
            "raw reads of the same sizes, samples/s",
            "loader / raw",
        ],
        rows,
    )


TABLES: dict[str, Callable[[], str]] = {
    f.__name__: f
    for f in (
        default_results,
        seed_spread,
        crop_draws,
        storage_modes,
        scaling,
        cost,
        cost_sweep,
        cost_derived,
        loader,
        loader_recipe,
        rehearsal,
        rehearsal_crops,
        gta_budget,
        gta_passes,
        passes,
        pca_head,
        prompting,
        tuning,
        clean_features,
        rehearsal_clean,
        dvc_scale,
        dvc_shard_mb,
        recipe_reads,
    )
}
# ---- figures quoted in prose: <!-- value:NAME --> ... <!-- /value --> ----------------------


def _seed_means() -> list[float]:
    e = _exps()
    return [_mean(e[n]) for n in SEEDS if n in e]


def _tuning_gains(a: str, b: str) -> dict[str, float]:
    e = _exps()
    ta, tb = e[a]["metrics"]["tuned"], e[b]["metrics"]["tuned"]
    return {t: (ta[t]["after"] + tb[t]["after"]) / 2 - ta[t]["before"] for t in TARGETS}


def _scores(name: str) -> dict:
    return json.loads((ROOT / "metrics" / name).read_text())


VALUES: dict[str, Callable[[], str]] = {
    # the head's seed range (results.md, README.md)
    "seed_range": lambda: _f(max(_seed_means()) - min(_seed_means()), 2),
    "seed_low_high": lambda: f"{min(_seed_means()):.2f} to {max(_seed_means()):.2f}",
    "seed_mean": lambda: _f(sum(_seed_means()) / len(_seed_means()), 2),
    "seed_source_range": lambda: _f(
        max(_exps()[n]["metrics"]["scores"]["game"]["mIoU"] for n in SEEDS)
        - min(_exps()[n]["metrics"]["scores"]["game"]["mIoU"] for n in SEEDS)
    ),
    "committed_targets_mean": lambda: _f(
        sum(_scores("scores.json")[t]["mIoU"] for t in TARGETS) / len(TARGETS), 2
    ),
    "committed_source": lambda: _f(_scores("scores.json")["game"]["mIoU"]),
    "scene_range": lambda: _f(_scene_range(_exps()), 2),
    # prompting and tuning (results.md)
    "prompting_max_delta": lambda: _f(
        max(
            abs(
                sum(_mean(_exps()[n]) for n in (k, f"{k}-seed-1", f"{k}-seed-2")) / 3
                - sum(_mean(_exps()[n]) for n in SCENE) / len(SCENE)
            )
            for k in PROMPTING
            if k != "prompt-scene"
        ),
        2,
    ),
    "tuning_max_spread": lambda: _f(
        max(
            abs(
                _exps()[a]["metrics"]["tuned"][t]["after"]
                - _exps()[b]["metrics"]["tuned"][t]["after"]
            )
            for a, b in TUNING
            for t in TARGETS
        ),
        2,
    ),
    "tune_rain_default": lambda: f"{_tuning_gains(*list(TUNING)[0])['rain']:+.2f}",
    "tune_rain_long": lambda: f"{_tuning_gains(*list(TUNING)[1])['rain']:+.2f}",
    "tune_mean_default": lambda: f"{sum(_tuning_gains(*list(TUNING)[0]).values()) / 4:+.2f}",
    "tune_mean_long": lambda: f"{sum(_tuning_gains(*list(TUNING)[1]).values()) / 4:+.2f}",
    # crop draws (recipes.md)
    "k2_over_k1": lambda: _f(_mean(_exps()["crop-draws-k2"]) - _mean(_exps()["crop-draws-k1"]), 2),
    # clean features (recipes.md)
    "clean_below_pretrained": lambda: _f(
        _mean(_exps()["prompt-scene"]) - _mean(_exps()["clean-pretrained"]), 1
    ),
    "clean_below_tuned": lambda: _f(
        _mean(_exps()["prompt-scene"]) - _mean(_exps()["cleandift"]), 1
    ),
    # what the cache saves (scale.md)
    "cost_load": lambda: "{:.1f} before, {:.1f} after".format(
        _load("cost")["load_before"][0], _load("cost")["load_after"][0]
    ),
    "cost_read_share": lambda: "{:.1f}–{:.1f} %".format(
        *(
            f(
                100 * v["cached"]["read_median_s"] / v["cached"]["median_s"]
                for v in _load("cost")["measured"].values()
            )
            for f in (min, max)
        )
    ),
    "cost_saved_40k": lambda: "{:.1f}–{:.1f}×".format(
        *(
            f(
                v["40k_iterations"]["online_over_cached"]
                for k, v in _load("cost")["sweep_8_experiments_from_measured"].items()
                if isinstance(v, dict)
            )
            for f in (min, max)
        )
    ),
    "cost_break_even": lambda: "{:,}".format(
        round(
            min(
                v["break_even_head_iterations"]
                for v in _load("cost")["sweep_8_experiments_from_measured"].values()
                if isinstance(v, dict)
            ),
            -3,
        )
    ),
    "passes_fewer": lambda: "{:.0f} %".format(
        100
        * (
            1
            - _load("passes")["per_draw"]["after"]["unet_passes"]
            / _load("passes")["per_draw"]["before"]["unet_passes"]
        )
    ),
    "passes_saved": lambda: "{:.0f} %".format(
        100
        * (
            1
            - _load("passes")["per_draw"]["after"]["median_s"]
            / _load("passes")["per_draw"]["before"]["median_s"]
        )
    ),
    "budget_recipe_tb": lambda: f"{_load('budget')['modes']['pca-64-int8']['features_TB']:.2f} TB",
    "budget_fp16_tb": lambda: f"{_load('budget')['modes']['fp16']['features_TB']:.1f} TB",
    "rehearsal_plan_bytes": lambda: "{:,} bytes projected, {:,} written".format(
        _load("rehearsal")["checks"]["plan"]["features"]["projected"],
        _load("rehearsal")["checks"]["plan"]["features"]["actual"],
    ),
    "rehearsal_traj_share": lambda: _f(
        _load("rehearsal")["checks"]["plan"]["trajectories"]["actual_over_projected"], 2
    ),
    "store_io_load": lambda: "{:.1f} before, {:.1f} after".format(
        _load("store_io")["load_before"][0], _load("store_io")["load_after"][0]
    ),
    "int8_over_fp16": lambda: "{:.1f}×".format(
        _load("store_io")["diff_recipe"]["modes"]["int8"]["samples_per_s_cold_random_order"]
        / _load("store_io")["diff_recipe"]["modes"]["fp16"]["samples_per_s_cold_random_order"]
    ),
    "pca_int8_over_fp16": lambda: "{:.1f}×".format(
        _load("store_io")["diff_recipe"]["modes"]["pca-64-int8"]["samples_per_s_cold_random_order"]
        / _load("store_io")["diff_recipe"]["modes"]["fp16"]["samples_per_s_cold_random_order"]
    ),
    "compression_best_kept": lambda: _f(
        min(c["kept"] for mode in _load("store_io")["compression"].values() for c in mode.values()),
        2,
    ),
    # reads at the recipe's scale (scale.md)
    "reads_before": lambda: f"{_load('recipe_reads')['layouts']['before']['reads_per_sample']:,}",
    "reads_after": lambda: f"{_load('recipe_reads')['layouts']['after']['reads_per_sample']:,}",
    "reads_speedup": lambda: "{:.1f}×".format(
        _load("recipe_reads")["layouts"]["after"]["loader_samples_s"]["median"]
        / _load("recipe_reads")["layouts"]["before"]["loader_samples_s"]["median"]
    ),
    "reads_of_raw": lambda: "{:.0f} %".format(
        100 * _load("recipe_reads")["layouts"]["after"]["loader_over_raw"]["median"]
    ),
    "store_files_after": lambda: f"{_load('dvc_scale')['layouts']['after']['store_files']:,}",
    "store_files_before": lambda: f"{_load('dvc_scale')['layouts']['before']['store_files']:,}",
    "cleandift_agreement": lambda: "from {:.2f} to {:.2f}".format(
        -_exps()["cleandift"]["metrics"]["cleandift"]["loss_first"],
        -_exps()["cleandift"]["metrics"]["cleandift"]["loss_last"],
    ),
}


MARK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)
VALUE = re.compile(r"(<!-- value:(\w+) -->)(.*?)(<!-- /value -->)", re.S)


def rebuild(text: str, where: str = "README.md") -> str:
    """A page's text with every marked table rebuilt."""

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"tables: error: {where}: table {name!r} has no builder")
        return f"{m.group(1)}{TABLES[name]()}\n{m.group(4)}"

    def value(m: re.Match) -> str:
        name = m.group(2)
        if name not in VALUES:
            raise SystemExit(f"tables: error: {where}: value {name!r} has no builder")
        return f"{m.group(1)}{VALUES[name]()}{m.group(4)}"

    return VALUE.sub(value, MARK.sub(sub, text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report tables that differ")
    args = ap.parse_args()
    found: dict[str, str] = {}
    differ = []
    for page in pages():
        where = str(page.relative_to(ROOT))
        text = page.read_text()
        for name in (m.group(2) for m in MARK.finditer(text)):
            if name in found:
                raise SystemExit(f"tables: error: table {name!r} in both {found[name]} and {where}")
            found[name] = where
        new = rebuild(text, where)
        if new == text:
            continue
        differ.append(where)
        if not args.check:
            page.write_text(new)
    used = {m.group(2) for page in pages() for m in VALUE.finditer(page.read_text())}
    unused = sorted(set(TABLES) - set(found)) + sorted(set(VALUES) - used)
    if unused:
        raise SystemExit(f"tables: error: no page has a marker for {unused}")
    if args.check and differ:
        print(f"{', '.join(differ)}: tables differ from benchmarks/results; run docs/tables.py")
        return 1
    print(f"{len(found)} tables in {len(set(found.values()))} pages; rewritten: {differ or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
