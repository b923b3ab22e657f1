"""A short Markdown summary of a run's metrics, with links to its figures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.classes import CLASSES
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_path


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def miou_table(evaluate: dict[str, Any], tuned: dict[str, Any] | None = None) -> str:
    """One row per domain: mIoU, aAcc, and the mIoU after prompt tuning where there is one."""
    lines = ["| domain | mIoU | aAcc | mIoU after prompt tuning |", "|---|---:|---:|---:|"]
    for domain, scores in evaluate.items():
        after = None
        if tuned and domain in tuned:
            after = tuned[domain]["after"]
        lines.append(
            f"| {domain} | {_fmt(scores['mIoU'])} | {_fmt(scores['aAcc'])} | {_fmt(after)} |"
        )
    return "\n".join(lines)


def class_table(evaluate: dict[str, Any]) -> str:
    """Per-class IoU, a column per domain."""
    domains = list(evaluate)
    lines = ["| class | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for name in CLASSES:
        cells = [_fmt(evaluate[d]["IoU"].get(name)) for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flat(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}/")
        elif isinstance(v, float):
            out.append(f"{prefix}{k} = {v:.4g}")
        elif isinstance(v, int | str):
            out.append(f"{prefix}{k} = {v}")
    return out


def build_report(metrics_dir: Path, live_dir: Path, plots_dir: Path, out: Path) -> str:
    """Render the summary for the metrics and figures found; missing parts are skipped."""
    evaluate = _load(metrics_dir / "evaluate.json")
    if evaluate is None:
        raise PipelineError(f"{metrics_dir / 'evaluate.json'}: no evaluation to report")
    tuned = _load(metrics_dir / "tuned.json")
    parts = ["# Run summary", "", "## Segmentation (mIoU %, 19 Cityscapes classes)", ""]
    parts += [miou_table(evaluate, tuned), ""]
    for name in ("train", "pretrain"):
        stage_metrics = {
            **(_load(live_dir / name / "metrics.json") or {}),
            **(_load(metrics_dir / f"{name}.json") or {}),
        }
        if stage_metrics:
            parts += [f"**{name}**: " + ", ".join(_flat(stage_metrics)), ""]
    parts += ["## Per-class IoU", "", class_table(evaluate), "", "## Figures", ""]
    for png in sorted(plots_dir.rglob("*.png")):
        rel = os.path.relpath(png, out.parent)
        parts.append(f"![{png.stem}]({rel})")
    return "\n".join(parts) + "\n"


def run(metrics_dir: str, live_dir: str, plots_dir: str, out: str) -> None:
    """The report stage: reports/summary.md from the metrics, dvclive's summaries, figures."""
    text = build_report(Path(metrics_dir), Path(live_dir), Path(plots_dir), Path(out))
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)
