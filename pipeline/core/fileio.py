"""Atomic outputs: write to a temporary sibling, move into place only when complete."""

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


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `dest` (file or folder); rename it onto `dest` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A killed writer's temporary folder (e.g. 640 predictions of an interrupted evaluate) is
    # this one's predecessor: nothing else writes `dest`, so it goes now.
    stale = re.compile(rf"^\.{re.escape(dest.name)}\.[a-z0-9_]{{8}}\.tmp$")
    for old in dest.parent.iterdir():
        if stale.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp = tmp_dir / dest.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {dest}")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
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


def folder_mb(path: str | os.PathLike[str]) -> float:
    """Megabytes (10^6) of the files under `path` (a file's own size if it is one)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


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
