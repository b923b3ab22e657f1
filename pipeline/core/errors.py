"""The project's exception types: one clear message naming the file or key and the problem."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from tqdm import tqdm


class PipelineError(Exception):
    """Base class for every error this project raises on purpose."""


class ConfigError(PipelineError):
    """A params.yaml key is missing, unknown, of the wrong type or out of range."""


class DataError(PipelineError):
    """A dataset file is missing, unreadable, inconsistent or outside its root."""


class ModelError(PipelineError):
    """A model folder or configuration is incomplete, unsafe or of the wrong kind."""


class StoreError(PipelineError):
    """A feature store is malformed, corrupt, or its identity differs from the requested one."""


class OutputError(PipelineError):
    """An output path holds something this pipeline did not write (it is never removed)."""


class IdentityError(StoreError):
    """A store holds other settings than the requested ones (readable, not damaged)."""


def run_stage(name: str, main: Callable[[], object]) -> NoReturn:
    """Run a stage's main; a PipelineError becomes one line on stderr and exit status 1."""
    try:
        main()
    except PipelineError as exc:
        # Close the progress bars the error interrupted: the message starts its own line.
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
