"""dvclive as the training stages use it: step-wise curves and a summary in the stage's folder."""

from __future__ import annotations

from pathlib import Path

from dvclive import Live


def open_live(live_dir: str) -> Live:
    """A dvclive logger whose outputs DVC's stage declares (dvc.yaml is ours, not dvclive's).

    Its plots folder exists even when nothing is logged (no pretraining steps, a skipped
    tuning): DVC fails a stage whose declared output is missing."""
    live = Live(live_dir, dvcyaml=False, save_dvc_exp=False, report=None)
    Path(live.plots_dir).mkdir(parents=True, exist_ok=True)
    return live
