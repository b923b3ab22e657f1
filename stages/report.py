"""DVC stage `report`: a Markdown summary of the metrics, with the figures."""

from __future__ import annotations

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's pipeline/, see stages/_checkout.py)

from pipeline.errors import run_stage
from pipeline.fileio import atomic_path
from pipeline.report import build_report


def main() -> None:
    out = Path("reports/summary.md")
    text = build_report(Path("metrics"), Path("plots"), out)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    run_stage("report", main)
