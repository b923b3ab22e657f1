"""Check everything the pipeline writes and reads back; list each bad file; repair with --delete.

    python -m pipeline.cache.verify                      # data/encoded, trajectories, features, heads
    python -m pipeline.cache.verify data/features        # some folders
    python -m pipeline.cache.verify --model data/model   # also re-hash the model's weights
    python -m pipeline.cache.verify --delete && dvc repro

What is checked: every chunk of every feature store (crc32c, truncation, a file missing where the
store marks its shard written), each store's and array's zarr.json and its done mask; every
chunk of the other Zarr arrays (latents, labels, trajectories); every file with a recorded
sha256 (the image index, prompt embeddings, the heads); with --model, every weight file against
the model's recorded fingerprint. And that the cache is whole: a store with shards not yet
written (an interrupted extract) and a store missing for a timestep of params.yaml or a set of
data/encoded's index are each one line. Exit status 1 when anything is bad or missing.

`--delete` removes what the next `dvc repro` recomputes: a store's bad shard files (extract
recomputes exactly those shards), a store or array with damaged metadata or chunks (the stage
that wrote it reruns), a file that fails its digest, the model's damaged files. What is missing
or unfinished is left for `dvc repro` to finish; nothing is deleted for it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import zarr

from pipeline.cache.encoded import INDEX_NAME, read_index, read_whole, shard_key
from pipeline.cache.store import FeatureStore, store_written_here
from pipeline.core.errors import OutputError, PipelineError, StoreError
from pipeline.core.fileio import DIGEST_SUFFIX, digest_problem, remove_written, written_here
from pipeline.core.fingerprint import verify_folder
from pipeline.core.params import load_params, read_timesteps

DEFAULT_FOLDERS = ("data/encoded", "data/trajectories", "data/features", "data/heads")
TIMESTEP_DIR = re.compile(r"t[0-9]+")  # extract@t's output under data/features
DIGESTED = ("index.parquet", "prompts.safetensors", "model.safetensors", "config.json")


@dataclasses.dataclass
class Problem:
    """A bad or missing file, what is wrong, and what --delete removes to repair it (None:
    nothing; `dvc repro` finishes it)."""

    file: Path
    problem: str
    remove: Path | None


def is_store(folder: Path) -> bool:
    """A feature store's folder: a group with `features/` and a `done` mask."""
    return (folder / "features").is_dir() and (folder / "done").is_dir()


def check_store(path: Path) -> list[Problem]:
    """Metadata, done mask and every shard of one feature store."""
    try:
        store = FeatureStore.open(path)
        damaged = store.check_metadata()
    except StoreError as e:
        return [Problem(path / "zarr.json", str(e).removeprefix(f"{path}: "), path)]
    if damaged:
        return [Problem(f, p, path) for f, p in damaged]
    out = [Problem(file, p, file) for _, file, p in store.verify(progress=True)]
    # Only the writer's own partial files are deleted; other foreign files are only named.
    out += [
        Problem(f, what, f if f.name.endswith(".partial") and not f.is_symlink() else None)
        for f, what in store.foreign_files()
    ]
    missing = store.missing_shards()
    if missing:
        out.append(
            Problem(
                path,
                f"incomplete: {len(missing)} of {store.n_shards} shards not "
                "written (an interrupted extract); `dvc repro` writes only those",
                None,
            )
        )
    return out


def check_whole(
    features: Path, sets: Sequence[str] | None, timesteps: Sequence[int] | None
) -> list[Problem]:
    """A store for every timestep (params.yaml's, else those present) and every encoded set
    (data/encoded's index, when there is one) under a features folder or one t<t> folder."""
    if TIMESTEP_DIR.fullmatch(features.name):
        folders = [features]
    else:
        present = sorted(p for p in features.iterdir() if TIMESTEP_DIR.fullmatch(p.name))
        wanted = [features / f"t{t}" for t in timesteps] if timesteps is not None else present
        folders = sorted(set(wanted) | set(present))
    out = []
    for folder in folders:
        if not folder.is_dir():
            out.append(
                Problem(
                    folder,
                    "missing: no store of this timestep of params.yaml; `dvc repro` extracts it",
                    None,
                )
            )
            continue
        for name in sets or []:
            if not (folder / name).exists():
                out.append(
                    Problem(
                        folder / name,
                        "missing: no store of this encoded set; `dvc repro` extracts it",
                        None,
                    )
                )
    return out


def check_array(path: Path) -> list[Problem]:
    """Every chunk of a Zarr array, shard by shard (a bad one named by its file)."""
    try:
        array = zarr.open_array(path, mode="r")
    except Exception as e:  # zarr raises several types for damaged metadata
        return [Problem(path / "zarr.json", f"unreadable array metadata ({e})", path)]
    rows = int(array.shards[0]) if array.shards else int(array.chunks[0])
    out = []
    for i, start in enumerate(range(0, array.shape[0], rows)):
        try:
            read_whole(array, slice(start, start + rows))
        except StoreError as e:
            file = path / shard_key(array.shape, i)
            out.append(Problem(file, str(e).split(": ", 1)[-1], path))
    return out


def check_digested(path: Path) -> list[Problem]:
    problem = digest_problem(path)
    return [] if problem is None else [Problem(path, problem, path)]


def check_folder(folder: Path) -> list[Problem]:
    """Everything verifiable under `folder`."""
    if is_store(folder):
        return check_store(folder)
    if (folder / "zarr.json").is_file() and folder.suffix == ".zarr":
        return check_array(folder)
    out = []
    if folder.is_file():
        return check_digested(folder) if folder.name in DIGESTED else []
    for child in sorted(folder.iterdir()):
        if child.is_dir():
            out += check_folder(child)
        elif child.name in DIGESTED or Path(f"{child}{DIGEST_SUFFIX}").exists():
            out += check_digested(child)
    return out


TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # fileio.atomic_path's folders


def leftover_temporaries(folder: Path) -> list[Problem]:
    """A killed stage's temporary folders beside `folder` (atomic_path's, with the mark): the
    next run of that stage removes them, but not when DVC restores it from its run-cache."""
    return [
        Problem(p, "a killed stage's temporary folder (the pipeline's own: --delete removes it)", p)
        for p in sorted(folder.absolute().parent.iterdir())
        if p.is_dir() and TEMPORARY.fullmatch(p.name) and written_here(p)
    ]


def check_model(path: Path) -> list[Problem]:
    """The model folder's weights against its recorded fingerprint (a full re-hash)."""
    found = verify_folder(path)
    if found is None:
        return []
    problem, files = found
    return [Problem(f, problem, f) for f in files] or [Problem(path, problem, path)]


def remove(path: Path) -> None:
    """Delete what the next `dvc repro` recomputes: a folder this pipeline wrote, or a file
    inside one (a store's shard file, a digested file); anything else is refused (OutputError),
    never deleted."""
    if path.is_dir():
        remove_written(path, store_written_here(path) if is_store(path) else None)
        return
    owners = [p for p in path.parents if is_store(p) and store_written_here(p)]
    if not owners and not written_here(path.parent):
        raise OutputError(f"{path}: not inside a folder this pipeline wrote; it is never deleted")
    path.unlink(missing_ok=True)
    Path(f"{path}{DIGEST_SUFFIX}").unlink(missing_ok=True)


def expected(encoded: Path, params: Path) -> tuple[list[str] | None, list[int] | None]:
    """(the encoded sets, the timesteps) a whole cache has stores for; None where unknown (a
    damaged index is reported by the digest check)."""
    sets = timesteps = None
    with contextlib.suppress(PipelineError):
        if (encoded / INDEX_NAME).is_file():
            sets = sorted(set(read_index(encoded)["set"]))
    if params.is_file():
        timesteps = read_timesteps(load_params(params), str(params))
    return sets, timesteps


def verify(
    folders: Sequence[str | os.PathLike[str]],
    delete: bool = False,
    model: str | None = None,
    encoded: str | os.PathLike[str] = "data/encoded",
    params: str | os.PathLike[str] = "params.yaml",
) -> int:
    """Print every bad or missing file (and what --delete removed); return how many there
    were. A features folder (or a t<t> folder) is also checked for missing stores."""
    problems: list[Problem] = []
    sets, timesteps = expected(Path(encoded), Path(params))
    for folder in map(Path, folders):
        if folder.exists():
            problems += check_folder(folder)
            problems += leftover_temporaries(folder)
            if folder.name == "features" or TIMESTEP_DIR.fullmatch(folder.name):
                problems += check_whole(folder, sets, timesteps)
    if model is not None:
        problems += check_model(Path(model))
    problems = list({p.file: p for p in problems}.values())  # a temporary seen from two folders
    removed = set()
    for p in problems:
        print(f"{p.file}: {p.problem}")
        if delete and p.remove is not None and p.remove not in removed:
            remove(p.remove)
            removed.add(p.remove)
            print(f"  deleted {p.remove}")
    checked = ", ".join(str(f) for f in [*folders, *([model] if model else [])])
    print(f"checked {checked}: {len(problems)} problems" + (" (deleted)" if removed else ""))
    return len(problems)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", help=f"folders to check (default: {DEFAULT_FOLDERS})")
    ap.add_argument("--model", help="a model folder to re-hash against its fingerprint")
    ap.add_argument("--delete", action="store_true", help="delete what `dvc repro` recomputes")
    args = ap.parse_args(argv)
    folders = args.folders or [f for f in DEFAULT_FOLDERS if Path(f).exists()]
    if not folders and args.model is None:
        sys.exit(f"verify: error: nothing to check (none of {', '.join(DEFAULT_FOLDERS)} exists)")
    missing = [f for f in args.folders if not Path(f).exists()]
    if missing:
        sys.exit(f"verify: error: {', '.join(missing)}: no such folder")
    try:
        sys.exit(1 if verify(folders, args.delete, args.model) else 0)
    except PipelineError as e:
        sys.exit(f"verify: error: {e}")


if __name__ == "__main__":
    main()
