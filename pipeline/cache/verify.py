"""Check every chunk of every feature store under some folders; list each bad shard file.

    python -m pipeline.cache.verify data/features [--delete]

A bad file fails a crc32c checksum or a decode, is truncated, or is missing although the store
marks its shard written. `--delete` removes the bad files; the next `extract@t` (or
`dvc repro`) then recomputes exactly those shards. Exit status 1 when anything is bad.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cache.store import FeatureStore
from pipeline.core.errors import StoreError


def find_stores(folder: str | os.PathLike[str]) -> list[Path]:
    """Feature stores at or below `folder` (Zarr groups that carry a store identity)."""
    found = []
    for meta in sorted(Path(folder).rglob("zarr.json")):
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            attrs = {}
        if "identity" in attrs:
            found.append(meta.parent)
    return found


def verify(folders: Sequence[str | os.PathLike[str]], delete: bool = False) -> int:
    """Print every bad shard file (and unreadable store); return how many there were."""
    stores = [s for f in folders for s in find_stores(f)]
    bad = 0
    for path in stores:
        try:
            problems = FeatureStore.open(path).verify(progress=True)
        except StoreError as e:
            print(e)
            bad += 1
            continue
        for _, file, problem in problems:
            print(f"{file}: {problem}")
            if delete:
                file.unlink(missing_ok=True)
        bad += len(problems)
    print(f"{len(stores)} stores, {bad} bad shard files" + (" (deleted)" if delete and bad else ""))
    return bad


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="stores, or folders holding them")
    ap.add_argument("--delete", action="store_true", help="delete the bad shard files")
    args = ap.parse_args(argv)
    if not any(find_stores(f) for f in args.folders):
        sys.exit(f"verify: error: no feature store under {' '.join(args.folders)}")
    sys.exit(1 if verify(args.folders, args.delete) else 0)


if __name__ == "__main__":
    main()
