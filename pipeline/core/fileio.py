"""Atomic outputs: write to a temporary sibling, move into place only when complete; and the
one rule for deleting: only what this pipeline wrote (a folder holding its marker)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.errors import OutputError

OWNER = "diffseg-cache"
# In every folder atomic_path writes; a Zarr store says the same in its zarr.json attributes
# (`written_by`), since Zarr readers warn about files that are not part of the hierarchy.
MARKER = ".diffseg-output"


def written_here(folder: str | os.PathLike[str]) -> bool:
    """Whether this pipeline wrote `folder`: it or a folder it lies in holds MARKER, or its
    zarr.json names OWNER."""
    folder = Path(folder).absolute()
    if any((p / MARKER).is_file() for p in (folder, *folder.parents)):
        return True
    try:
        attrs = json.loads((folder / "zarr.json").read_text()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("written_by") == OWNER


def check_replaceable(path: Path, owned: bool | None = None) -> None:
    """Refuse (OutputError) a non-empty folder at `path` this pipeline did not write."""
    if path.is_symlink() or not path.is_dir():
        return
    if owned is None:
        owned = written_here(path)
    entries = sorted(p.name for p in path.iterdir())
    if entries and not owned:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(
            f"{path}: not written by this pipeline (no {MARKER}) and not empty ({len(entries)} "
            f"entries: {shown}); it is never deleted: move it away, then rerun"
        )


def remove_written(path: str | os.PathLike[str], owned: bool | None = None) -> None:
    """Delete a file, a link, an empty folder or a folder this pipeline wrote (`owned`, when the
    caller proved it otherwise); any other folder is an OutputError naming what it holds."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if path.is_dir():
        check_replaceable(path, owned)
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `dest` (file or folder); rename it onto `dest` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(dest)  # before the work: a refusal then costs nothing
    # A killed writer's temporary folder (e.g. 640 predictions of an interrupted evaluate) is
    # this one's predecessor (it holds the marker): nothing else writes `dest`, so it goes now.
    stale = re.compile(rf"^\.{re.escape(dest.name)}\.[a-z0-9_]{{8}}\.tmp$")
    for old in dest.parent.iterdir():
        if stale.match(old.name) and written_here(old):
            shutil.rmtree(old, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    (tmp_dir / MARKER).write_text(f"{OWNER}: a stage's output being written\n")
    tmp = tmp_dir / dest.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {dest}")
        if tmp.is_dir() and not (tmp / "zarr.json").exists():
            (tmp / MARKER).write_text(f"{OWNER}: the stage that wrote this folder may replace it\n")
        remove_written(dest)  # refused: what is there stays as it was
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(rows: Sequence[dict], path: str | os.PathLike[str], columns: Sequence[str]) -> None:
    """Rows of dicts as CSV with a header (empty cells for None)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under `path` (a file's own size if it is one; 0 when absent)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def folder_mb(path: str | os.PathLike[str]) -> float:
    """Megabytes (10^6) of the files under `path`."""
    return folder_bytes(path) / 1e6


def write_timing(
    path: str | os.PathLike[str], seconds: float, output: str | os.PathLike[str]
) -> None:
    """A stage's metrics: its wall seconds and the megabytes it wrote."""
    write_json(path, {"seconds": round(seconds, 1), "MB": round(folder_mb(output), 1)})


DIGEST_SUFFIX = ".sha256"


def file_digest(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_digest(path: str | os.PathLike[str]) -> None:
    """Write `<path>.sha256` beside a finished file: readers check it (`checked_path`)."""
    Path(f"{path}{DIGEST_SUFFIX}").write_text(file_digest(path) + "\n")


def digest_problem(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a file against its recorded digest, or None when it matches."""
    path = Path(path)
    record = Path(f"{path}{DIGEST_SUFFIX}")
    if not path.is_file():
        return "missing"
    if not record.is_file():
        return f"no recorded digest ({record.name} missing)"
    if file_digest(path) != record.read_text().strip():
        return f"content differs from its recorded sha256 ({record.name}): corrupt or changed"
    return None
