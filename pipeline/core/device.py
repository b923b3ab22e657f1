"""Where torch runs: the device a stage uses, its CPU thread count, how batches reach it."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from pipeline.core.errors import ConfigError


def set_threads(threads: int) -> None:
    """torch.set_num_threads unless 0 (keep torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


# Locks on the GPUs this process claimed (cuda:free): held until it exits, so they live here.
_CLAIMED: list[int] = []
GPU_WAIT_S = 24 * 3600  # cuda:free waits this long at most for a GPU to come free


def claim_gpu(
    count: int,
    lock_dir: str | os.PathLike[str] | None = None,
    wait_s: float = 5.0,
    timeout_s: float = GPU_WAIT_S,
    key: str = "device",
) -> int:
    """The index of a GPU no other process has claimed (an flock per GPU, released when the
    claimer exits); waits (up to `timeout_s`) while all `count` are claimed. N queue workers on
    N GPUs thus run one experiment stage per GPU."""
    folder = Path(lock_dir or tempfile.gettempdir())
    start, told = time.monotonic(), False
    while True:
        for i in range(count):
            fd = os.open(folder / f"diffseg-gpu{i}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _CLAIMED.append(fd)
            return i
        if time.monotonic() - start > timeout_s:
            raise ConfigError(
                f"{key} cuda:free: all {count} GPUs stayed claimed by other stages for "
                f"{timeout_s:.0f} s"
            )
        if not told:
            print(f"cuda:free: all {count} GPUs are claimed by other stages; waiting", flush=True)
            told = True
        time.sleep(wait_s)


def check_device(device: str, key: str = "device", dtype: str = "fp32") -> None:
    """One ConfigError line, naming the key and what the machine has, for a device (or a half
    precision) this machine lacks; checked before any work starts."""
    if device in ("cpu", "auto"):
        return
    if not device.startswith("cuda"):
        raise ConfigError(
            f"{key} {device}: expected cpu, auto, cuda, cuda:<n> or cuda:free[:<seconds>]"
        )
    if device.startswith("cuda:free"):
        gpu_wait_s(device, key)  # the form, before what the machine has
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU{'s' * (count > 1)}"
    if count == 0:
        built = "" if torch.backends.cuda.is_built() else " (a CPU build of PyTorch)"
        raise ConfigError(f"{key} {device}: this machine has {has}{built}; use cpu or auto")
    index = device.partition(":")[2]
    if index and not index.startswith("free") and (not index.isdigit() or int(index) >= count):
        raise ConfigError(f"{key} {device}: this machine has {has} (cuda:0..cuda:{count - 1})")
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key} {device}: its GPU does not support bf16; use fp16 or fp32")


def gpu_wait_s(device: str, key: str = "device") -> float:
    """How long `cuda:free` (GPU_WAIT_S) or `cuda:free:<seconds>` waits for a GPU to come free."""
    wait = device.removeprefix("cuda:free").removeprefix(":")
    if device == "cuda:free":
        return GPU_WAIT_S
    if device.startswith("cuda:free:") and wait.replace(".", "", 1).isdigit():
        return float(wait)
    raise ConfigError(f"{key} {device}: expected cuda:free or cuda:free:<seconds to wait>")


def resolve_device(device: str, key: str = "device") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda:free[:<seconds>]' -> a GPU no other
    stage holds. A device this machine lacks is one ConfigError naming `key` (check_device)."""
    check_device(device, key)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:free"):
        wait = gpu_wait_s(device, key)
        return f"cuda:{claim_gpu(torch.cuda.device_count(), timeout_s=wait, key=key)}"
    return device


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB."""
    # Linux: VmHWM, since ru_maxrss survives fork + exec: a stage started by a 1 GB parent
    # (dvc, a benchmark) reported that parent's 1 GB as its own peak (measured).
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)


def data_loader(
    dataset: Dataset, device: str, workers: int, prefetch: int, **kwargs: Any
) -> DataLoader:
    """A DataLoader whose batches land in pinned memory on CUDA (so the copy to the GPU, made
    with non_blocking=True, overlaps compute); `workers` processes each read `prefetch`
    batches ahead."""
    return DataLoader(
        dataset,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
        **kwargs,
    )


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device): under torchrun the process group is started
    (NCCL on CUDA, gloo on CPU) and each rank gets its own GPU; alone (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def array_task() -> tuple[int, int] | None:
    """(task, tasks) of this process in a Slurm job array (`sbatch --array`), from the variables
    Slurm sets; None outside one."""
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if count is None:
        return None
    try:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", "1"))
        task = (int(os.environ["SLURM_ARRAY_TASK_ID"]) - first) // step
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"SLURM_ARRAY_TASK_*: not a Slurm array task's environment ({e})"
        ) from None
    if not 0 <= task < int(count):
        raise ConfigError(f"SLURM_ARRAY_TASK_ID: task {task} outside the array's {count} tasks")
    return task, int(count)


@dataclasses.dataclass(frozen=True)
class Workers:
    """This process among the writers of one job: alone, a rank of torchrun (on one node or
    several: a process group, so barriers), or a task of a Slurm job array (independent tasks
    that share only the filesystem: no barrier, so each owns a fixed share of the work)."""

    rank: int = 0
    world: int = 1
    synced: bool = True

    @classmethod
    def start(cls, device: str, key: str = "device") -> tuple[Workers, str]:
        """The workers this process belongs to (starting torchrun's process group) and the
        device it computes on. A torchrun per array task counts its ranks within the task."""
        task = array_task()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            check_device(device, key)
            rank, world, device = init_distributed(device)
        else:
            rank, world, device = 0, 1, resolve_device(device, key)
        if task is None:
            return cls(rank, world), device
        return cls(task[0] * world + rank, task[1] * world, synced=False), device

    def barrier(self) -> None:
        """Wait for every rank of a process group (nothing for array tasks or alone)."""
        if self.synced and self.world > 1:
            dist.barrier()

    def share(self, missing: list[int]) -> list[int]:
        """This writer's shards among the missing ones, disjoint across writers: ranks that all
        read the same list (after a barrier) split it evenly; array tasks, which may each read
        it at another time, own shard s when s % world == rank."""
        if self.synced:
            n = len(missing)
            return list(missing[self.rank * n // self.world : (self.rank + 1) * n // self.world])
        return [s for s in missing if s % self.world == self.rank]

    def close(self) -> None:
        """End torchrun's process group, if this process started one."""
        if dist.is_initialized():
            dist.destroy_process_group()


ALONE = Workers()  # one process, the default writer


def barrier(world: int) -> None:
    """Wait for every rank (nothing when alone)."""
    if world > 1:
        dist.barrier()


def mean_over_ranks(value: float, world: int, device: str) -> float:
    """A number averaged over the ranks (itself when alone)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / world)
