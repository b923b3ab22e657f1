"""Fingerprints of model folders: sha256 over the configs (minus version keys) and weight files,
recorded once with each file's size (fingerprint.json in a folder written here) or size and
mtime (pointer.json to an external folder), and checked in full when asked (`verify --model`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.core.errors import ModelError

POINTER_FILE = "pointer.json"
FINGERPRINT_FILE = "fingerprint.json"
# Keys that change with library versions or save location, not with what the model computes.
_VOLATILE_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}


def read_pointer(path: Path) -> dict | None:
    """A pointer folder's record {target, fingerprint, files}, or None if `path` is no pointer."""
    pointer = path / POINTER_FILE
    if not pointer.is_file() or (path / "model_index.json").exists():
        return None
    try:
        info = json.loads(pointer.read_text())
        return {
            "target": str(info["target"]),
            "fingerprint": str(info["fingerprint"]),
            "files": info.get("files"),
        }
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{pointer}: not a valid model pointer ({e})") from e


def hashed_files(root: Path) -> list[Path]:
    """The files a fingerprint covers: configs, weights, tokenizer tables."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in (".json", ".safetensors", ".txt")
        and p.name != FINGERPRINT_FILE
    )


def folder_stats(root: Path, mtimes: bool = True) -> dict[str, list[int]]:
    """Size (and mtime, ns) of each hashed file: what tells a recorded fingerprint still holds.
    Without mtimes for the folders written here: fingerprint.json is part of a DVC output, and
    identical weights rebuilt must give the identical file (DVC tracks their content itself)."""
    out = {}
    for f in hashed_files(root):
        st = f.stat()
        out[f.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns][: 2 if mtimes else 1]
    return out


def hash_folder(
    root: Path, mtimes: bool = True
) -> tuple[str, dict[str, list[int]], dict[str, str]]:
    """(fingerprint, stats, each file's digest) of a folder, every file read."""
    h = hashlib.sha256()
    digests = {}
    for f in hashed_files(root):
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".json":
            try:
                obj = json.loads(f.read_text())
            except ValueError as e:
                raise ModelError(f"{f}: invalid JSON ({e})") from e
            if isinstance(obj, dict):
                obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
            digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        else:
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        h.update(f"{rel}\0{digest}\n".encode())
        digests[rel] = digest
    return h.hexdigest()[:16], folder_stats(root, mtimes), digests


def record(fp: str, stats: dict, digests: dict) -> dict:
    """What fingerprint.json and pointer.json hold: the fingerprint, the files' size and mtime
    (a changed file is re-hashed), and each file's digest (`verify` names a damaged one)."""
    return {"fingerprint": fp, "files": stats, "digests": digests}


def verify_folder(path: str | os.PathLike[str]) -> tuple[str, list[Path]] | None:
    """Re-hash a model folder (or a pointer's target) in full against its recorded fingerprint:
    (what is wrong, the damaged files where the record names them), or None. Catches damage
    that kept each file's size and mtime."""
    path = Path(path)
    info = read_pointer(path)
    if info is not None:
        root, rec = Path(info["target"]), path / POINTER_FILE
    else:
        root, rec = path, path / FINGERPRINT_FILE
    if not rec.is_file():
        return f"no recorded fingerprint ({rec.name} missing)", []
    try:
        saved = json.loads(rec.read_text())
        recorded, digests = str(saved["fingerprint"]), saved.get("digests") or {}
    except (ValueError, KeyError, TypeError) as e:
        return f"{rec.name} unreadable ({e})", []
    try:
        now, _, found = hash_folder(root)
    except (ModelError, OSError) as e:
        return str(e), []
    if now == recorded:
        return None
    changed = sorted(f for f in set(digests) | set(found) if digests.get(f) != found.get(f))
    message = f"files hash to {now}, not the recorded fingerprint {recorded}: corrupt or changed"
    return message, [root / f for f in changed] if digests else []
