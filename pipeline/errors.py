"""The project's exception types: one clear message naming the file and the problem."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class PipelineError(Exception):
    """Base class for every error this project raises on purpose."""


class DataError(PipelineError):
    """A dataset file is missing, unreadable, inconsistent or outside its root."""


class ModelError(PipelineError):
    """A diffusion-model folder is incomplete, unsafe or of the wrong kind."""


class StoreError(PipelineError):
    """A feature store is malformed, or its identity differs from the requested one."""


def run_stage(name: str, main: Callable[[], int | None]) -> NoReturn:
    """Run a stage's main; a PipelineError becomes one line on stderr and exit status 1."""
    try:
        sys.exit(main())
    except PipelineError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)
