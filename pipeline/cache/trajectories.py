"""The layout of data/trajectories (written by invert): DIFF's DDIM-inversion trajectory of every
image and draw of each encoded set, so that extract@t is one UNet pass at x_t.

```
data/trajectories/<set>/plain.zarr   (N, K, S, C, h, w): x_i, the UNet input of step i
data/trajectories/<set>/guided.zarr  the same for DIFF's guided path (training rows of the
                                     source, with DIFF's guided variant; other rows: plain)
data/trajectories/README.txt         under a noise mode that does not invert (add, clean): a note
```
Arrays as data/encoded's (one image per chunk, crc32c on every chunk); the attributes record
what the values depend on and the UNet timestep of each step.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import zarr

from pipeline.core.errors import ConfigError, StoreError

PLAIN_NAME, GUIDED_NAME = "plain.zarr", "guided.zarr"
NOTE = "README.txt"


def trajectory_fingerprint(attrs: dict) -> str:
    """What a trajectory's values depend on, hashed (a feature store records it)."""
    return hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16]


def trajectory_path(traj_dir: str | os.PathLike[str], name: str, guided: bool) -> Path:
    return Path(traj_dir) / name / (GUIDED_NAME if guided else PLAIN_NAME)


def open_trajectory(traj_dir: str | os.PathLike[str], name: str, guided: bool) -> zarr.Array:
    """A set's trajectory (N, K, S, C, h, w), read-only."""
    path = trajectory_path(traj_dir, name, guided)
    if not path.exists():
        raise StoreError(f"{path}: no trajectory (run invert with extract.noise_mode trajectory)")
    try:
        return zarr.open_array(path, mode="r")
    except Exception as e:  # zarr raises several types for damaged metadata
        raise StoreError(f"{path}: unreadable trajectory metadata ({e}); rerun invert") from None


def trajectory_step(trajectory: zarr.Array, timestep: int) -> int:
    """The step of a trajectory whose UNet pass runs at `timestep`; a ConfigError if none."""
    ts = [int(t) for t in trajectory.attrs["unet_timesteps"]]
    check_on_schedule([timestep], ts)
    return ts.index(timestep)


def check_on_schedule(timesteps: list[int], unet_timesteps: list[int]) -> None:
    """With extract.noise_mode trajectory every timestep is one of the inversion's UNet steps."""
    off = [t for t in timesteps if t not in unet_timesteps]
    if off:
        raise ConfigError(
            f"timesteps {off}: not on the inversion schedule (extract.noise_mode trajectory): "
            f"its UNet passes run at {unet_timesteps} (DIFF's save_timestep i reads step i; "
            "invert.last_timestep ends the schedule)"
        )
