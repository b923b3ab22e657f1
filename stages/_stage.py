"""What every stage script shares: this checkout's `pipeline/` first, and one command-line form.

`dvc exp run --queue` runs stages in temporary copies of the repository; with the editable
install, `pipeline` would otherwise come from the main workspace: code the experiment never saw.
A stage takes its input and output paths as positional arguments, in the order dvc.yaml's
`cmd` gives them, and `--params` (default params.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.params import load_params  # noqa: E402


def parse(
    doc: str,
    *paths: str,
    switches: dict[str, str] | None = None,
    options: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> tuple[argparse.Namespace, dict]:
    """The stage's paths (positional, named by `paths`), on/off `switches` ({--name: help}),
    required text `options` ({--name: help}; the stage validates them) and its params file."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name in paths:
        ap.add_argument(name)
    for flag, text in (switches or {}).items():
        ap.add_argument(flag, action="store_true", help=text)
    for flag, text in (options or {}).items():
        ap.add_argument(flag, required=True, help=text)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    return args, load_params(args.params)
