"""What every committed benchmark result records: the machine, the load before and after, the
commit, the exact command; and the rule that a benchmark whose own check fails writes nothing."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]  # the project: benchmarks and experiments write here


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, torch build and threads, GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load() -> list[float]:
    """The 1, 5 and 15-minute load averages (a shared 2-core machine: timings scale with it)."""
    return [round(x, 2) for x in os.getloadavg()]


def commit() -> str:
    """The commit measured, with `+dirty` when the work tree differs from it."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    rev = git("rev-parse", "HEAD") or "unknown"
    dirty = git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "pipeline",
        "stages",
        "benchmarks",
        "experiments/run.py",
        ":!benchmarks/results",  # results being written are not the code measured
    )
    return rev + ("+dirty" if dirty else "")


def drop_page_cache() -> bool:
    """Empty the OS page cache, so the next read is cold; False where not allowed (not root)."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


class Run:
    """One benchmark run: `Run()` at the start notes the load, commit and command; `write()`
    adds the load after and writes the results; `fail()` exits non-zero writing nothing."""

    def __init__(self) -> None:
        self.before = load()
        self.commit = commit()
        self.command = "python " + shlex.join(
            [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]
        )

    def header(self) -> dict[str, Any]:
        return {
            "machine": machine_info(),
            "load_before": self.before,
            "load_after": load(),
            "commit": self.commit,
            "command": self.command,
        }

    def check(self, ok: bool, what: str, detail: object = None) -> None:
        """The benchmark's own consistency check: on failure, exit 1 and write nothing."""
        if not ok:
            self.fail(
                f"{what}" + (f": {json.dumps(detail, default=str)}" if detail is not None else "")
            )

    def fail(self, why: str) -> None:
        sys.exit(f"{Path(sys.argv[0]).name}: check failed, nothing written: {why}")

    def write(self, path: str | os.PathLike[str], results: dict[str, Any]) -> dict[str, Any]:
        out = {**self.header(), **results}
        Path(path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")
        return out
