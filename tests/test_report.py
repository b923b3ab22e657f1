import json
from pathlib import Path

import pytest

from pipeline.core.classes import CLASSES
from pipeline.core.errors import PipelineError
from pipeline.loops.report import build_report


def _scores(miou: float) -> dict:
    iou = {name: miou for name in CLASSES}
    iou["train"] = None
    return {"mIoU": miou, "aAcc": 90.0, "IoU": iou}


def test_report_lists_every_domain_and_tuning(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "evaluate.json").write_text(
        json.dumps({"game": _scores(60.0), "fog": _scores(30.0)})
    )
    (metrics / "tuned.json").write_text(json.dumps({"fog": {"before": 30.0, "after": 33.5}}))
    (metrics / "train.json").write_text(json.dumps({"iterations": 400, "seconds": 12.5}))
    live = tmp_path / "dvclive" / "train"
    live.mkdir(parents=True)
    (live / "metrics.json").write_text(json.dumps({"step": 400, "val": {"mIoU": 44.25}}))
    plots = tmp_path / "plots" / "evaluate"
    plots.mkdir(parents=True)
    (plots / "overlays_fog.png").write_bytes(b"")
    text = build_report(
        metrics, tmp_path / "dvclive", tmp_path / "plots", tmp_path / "reports" / "summary.md"
    )
    assert "**train**: step = 400, val/mIoU = 44.25, iterations = 400, seconds = 12.5" in text
    assert "| game | 60.0 | 90.0 | – |" in text
    assert "| fog | 30.0 | 90.0 | 33.5 |" in text
    assert "| train | – | – |" in text
    assert "](../plots/evaluate/overlays_fog.png)" in text


def test_report_without_evaluation_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="evaluate.json: no evaluation to report"):
        build_report(tmp_path, tmp_path, tmp_path, tmp_path / "summary.md")
