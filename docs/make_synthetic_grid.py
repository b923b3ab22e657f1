"""Write docs/synthetic_grid.png: one synthetic scene in every domain beside its label colors.

Usage: python docs/make_synthetic_grid.py [--out docs/synthetic_grid.png] [--index 3]
"""

from __future__ import annotations

import argparse

from pipeline.data.images import write_png
from pipeline.data.synthetic import SceneGenerator, sample_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/synthetic_grid.png")
    ap.add_argument("--index", type=int, default=3)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()
    write_png(args.out, sample_grid(SceneGenerator(args.height, args.width, 0), args.index), 9)


if __name__ == "__main__":
    main()
