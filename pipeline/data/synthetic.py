"""Synthetic multi-domain street scenes: one shared layout per (seed, split, index), appearance per domain.

A scene is built in a simple pinhole world (flat ground, camera at fixed height, facades on planes
beside the road, objects as boxes and sprites painted far to near), so every class has perspective.
The layout is rendered into a key map (class id, color slot, surface detail) plus a depth map; a
domain only changes how keys and depth become colors (palette, texture, blur, haze, lights,
weather, noise). All randomness comes from generators seeded by (seed, split, index[, domain]),
so the same arguments give byte-identical images and labels in any order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from pipeline.core.classes import NUM_CLASSES, colorize

DOMAINS: tuple[str, ...] = ("game", "real", "fog", "night", "rain", "snow")
_DOMAIN_CODE = {name: i for i, name in enumerate(DOMAINS)}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "pretrain": 4}  # pretrain: unlabeled extras

(
    ROAD,
    SIDEWALK,
    BUILDING,
    WALL,
    FENCE,
    POLE,
    LIGHT,
    SIGN,
    VEG,
    TERRAIN,
    SKY,
    PERSON,
    RIDER,
    CAR,
    TRUCK,
    BUS,
    TRAIN,
    MOTO,
    BIKE,
) = range(NUM_CLASSES)

# Surface details: how a pixel of a class departs from the class color.
D_NONE, D_MARK, D_GLASS, D_DARK, D_LAMP, D_LITWIN, D_HEAD, D_TAIL = range(8)
_N_TINT = 16  # color slots per class (car paint, facade shade, ...)
SKY_DEPTH = 1.0e4

# Light kinds in SceneLayout.lights.
L_LAMP, L_HEAD, L_TAIL, L_SIGNAL = range(4)
_RAIN_SLANTS = (-0.3, -0.15, 0.0, 0.15, 0.3)  # streak dx per dy, one per rain bank map


def _key(cls: int, tint: int = 0, detail: int = 0) -> int:
    return (cls * _N_TINT + tint) * 8 + detail


def _paint(dst: np.ndarray, src: np.ndarray | float, mask: np.ndarray) -> None:
    """dst[mask] = src (broadcast), exactly; like np.copyto(dst, src, where=mask).

    Large masks use a branch-free bit select on the raw bits (dst ^= (dst ^ src) & -mask):
    masked copies branch per pixel and cost several times more on ragged object masks.
    """
    if dst.size < 4096:  # small sprites: call overhead dominates, one masked copy is best
        np.copyto(dst, src, where=mask, casting="unsafe")
        return
    src = np.asarray(src, dtype=dst.dtype)
    bits = {2: np.uint16, 4: np.uint32}[dst.itemsize]
    raw = dst.view(bits)
    ones = np.broadcast_to(mask, dst.shape).astype(bits)
    np.negative(ones, out=ones)  # True -> all bits set
    diff = np.bitwise_xor(raw, src.view(bits))
    diff &= ones
    raw ^= diff


@dataclasses.dataclass(frozen=True)
class SceneLayout:
    """Everything a domain needs to render one scene; `label` is the ground truth."""

    label: np.ndarray  # (H, W) uint8 train ids
    key: np.ndarray  # (H, W) uint16 (class * 16 + tint) * 8 + detail
    depth: np.ndarray  # (H, W) float32 metres along the view axis (sky: SKY_DEPTH)
    lights: np.ndarray  # (K, 4) float32 rows (y, x, radius_px, kind)
    horizon: float


class _Canvas:
    """Key and depth buffers plus the camera; objects are painted far to near."""

    def __init__(self, height: int, width: int, horizon: float, vx: float, focal: float):
        self.h, self.w = height, width
        self.horizon, self.vx, self.f = horizon, vx, focal
        self.cam_h = 1.5
        self.key = np.full((height, width), _key(SKY), dtype=np.uint16)
        self.depth = np.full((height, width), SKY_DEPTH, dtype=np.float32)
        self.lights: list[tuple[float, float, float, float]] = []

    def project(self, x: float, z: float, y_up: float = 0.0) -> tuple[float, float]:
        """Image (row, col) of world point (lateral x, height y_up above ground, depth z)."""
        s = self.f / z
        return self.horizon + (self.cam_h - y_up) * s, self.vx + x * s

    def sprite(
        self,
        x: float,
        z: float,
        width: float,
        height: float,
        shape: Callable[[np.ndarray, np.ndarray], list[tuple[np.ndarray, int]]] | int,
        y_up: float = 0.0,
    ) -> None:
        """Paint a flat sprite standing at (x, z): a solid key, or `shape(v, u)` mask layers."""
        s = self.f / z
        bottom = self.horizon + (self.cam_h - y_up) * s
        hp, wp = height * s, max(width * s, 1.0)  # thin things (poles) stay one pixel wide
        top, left = bottom - hp, self.vx + x * s - wp / 2
        r0, r1 = max(int(top), 0), min(int(bottom + 0.999), self.h)
        c0, c1 = max(int(left), 0), min(int(left + wp + 0.999), self.w)
        if r1 <= r0 or c1 <= c0 or hp < 1.5:
            return
        kview, dview = self.key[r0:r1, c0:c1], self.depth[r0:r1, c0:c1]
        if isinstance(shape, int):
            kview[...] = shape
            dview[...] = z
            return
        v = ((np.arange(r0, r1, dtype=np.float32) + 0.5 - top) / hp)[:, None]
        u = ((np.arange(c0, c1, dtype=np.float32) + 0.5 - left) / wp)[None, :]
        for mask, key in shape(v, u):
            _paint(kview, key, mask)
            _paint(dview, z, mask)

    def box(
        self,
        x0: float,
        x1: float,
        z0: float,
        z1: float,
        height: float,
        cls: int,
        tint: int,
        rear: Callable[[np.ndarray, np.ndarray], np.ndarray],
        side: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> None:
        """Paint a vehicle-like box: its side face (if visible) then its rear/front face.

        `rear(v, u)` and `side(height_m, t_along)` return detail codes for the faces.
        """
        base = _key(cls, tint)
        xs = x1 if x1 < 0 else (x0 if x0 > 0 else None)
        if xs is not None:
            ca, cb = sorted((self.project(xs, z1)[1], self.project(xs, z0)[1]))
            c0, c1 = max(int(np.floor(ca)), 0), min(int(np.ceil(cb)), self.w)
            if c1 > c0:
                cols = np.arange(c0, c1, dtype=np.float32) + 0.5 - self.vx
                cols[np.abs(cols) < 1e-3] = 1e-3
                z = np.clip(xs * self.f / cols, z0, z1)
                top = self.horizon - (height - self.cam_h) * self.f / z
                bot = self.horizon + self.cam_h * self.f / z
                r0, r1 = max(int(np.floor(top.min())), 0), min(int(np.ceil(bot.max())), self.h)
                if r1 > r0:
                    rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
                    mask = (rows >= top) & (rows < bot)
                    y_up = self.cam_h - (rows - self.horizon) * z / self.f
                    detail = side(y_up / height, (z - z0) / (z1 - z0))
                    keys = base + detail  # uint16: detail codes are uint16
                    kview, dview = self.key[r0:r1, c0:c1], self.depth[r0:r1, c0:c1]
                    _paint(kview, keys, mask)
                    _paint(dview, z, mask)
        bottom, left = self.project(x0, z0)
        _, right = self.project(x1, z0)
        top, _ = self.project(x0, z0, height)
        hp, wp = bottom - top, max(right - left, 1.0)
        r0, r1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), self.h)
        c0, c1 = max(int(np.floor(left)), 0), min(int(np.ceil(left + wp)), self.w)
        if r1 > r0 and c1 > c0:
            v = ((np.arange(r0, r1, dtype=np.float32) + 0.5 - top) / hp)[:, None]
            u = ((np.arange(c0, c1, dtype=np.float32) + 0.5 - left) / wp)[None, :]
            keys = base + rear(v, u)
            self.key[r0:r1, c0:c1] = np.broadcast_to(keys, (r1 - r0, c1 - c0))
            self.depth[r0:r1, c0:c1] = z0


# ---- shapes (normalized sprite coordinates: v down 0..1, u across 0..1) ----


def _person_mask(v: np.ndarray, u: np.ndarray, stride: float) -> np.ndarray:
    head = ((u - 0.5) / 0.17) ** 2 + ((v - 0.08) / 0.08) ** 2 < 1.0
    torso = (np.abs(u - 0.5) < 0.26) & (v > 0.15) & (v < 0.56)
    arms = (np.abs(u - 0.5) < 0.36) & (v > 0.18) & (v < 0.46) & (np.abs(u - 0.5) > 0.27)
    legs = (v >= 0.55) & (
        (np.abs(u - 0.5 + stride * (v - 0.55)) < 0.1)
        | (np.abs(u - 0.5 - stride * (v - 0.55)) < 0.1)
    )
    return head | torso | arms | legs


def _wheels_mask(v: np.ndarray, u: np.ndarray, thick: float) -> np.ndarray:
    ring = np.zeros(np.broadcast_shapes(v.shape, u.shape), dtype=bool)
    for cu in (0.2, 0.8):
        r = np.sqrt(((u - cu) / 0.2) ** 2 + ((v - 0.72) / 0.28) ** 2)
        ring |= (r < 1.0) & (r > 1.0 - thick)
    return ring


def _bike_shapes(cls: int, tint: int, motor: bool):
    def shape(v: np.ndarray, u: np.ndarray):
        wheels = _wheels_mask(v, u, 0.6 if motor else 0.22)
        if motor:
            frame = ((u - 0.5) / 0.3) ** 2 + ((v - 0.5) / 0.22) ** 2 < 1.0
        else:
            frame = (np.abs((v - 0.72) - (u - 0.2) * -0.8) < 0.06) & (u > 0.2) & (u < 0.6)
            frame |= (np.abs(v - 0.45) < 0.05) & (u > 0.35) & (u < 0.75)
            frame |= (np.abs(u - 0.75) < 0.04) & (v > 0.3) & (v < 0.72)
        return [(wheels, _key(cls, tint, D_DARK)), (frame, _key(cls, tint))]

    return shape


def _tree_shape(tint: int, phase: float):
    def shape(v: np.ndarray, u: np.ndarray):
        dv, du = v - 0.35, u - 0.5
        dist = np.hypot(du, dv * 0.75)
        # The wavy crown radius lies in [0.24, 0.40]: inside/outside is certain away from that
        # band, so the slow arctan2 is only evaluated on the band (the same values per pixel).
        crown = dist < 0.2399
        band = (dist >= 0.2399) & (dist < 0.4001)
        shape = band.shape
        ang = np.arctan2(np.broadcast_to(dv, shape)[band], np.broadcast_to(du, shape)[band])
        rad = 0.32 + 0.05 * np.sin(5 * ang + phase) + 0.03 * np.sin(11 * ang + 2 * phase)
        crown[band] = dist[band] < rad
        trunk = (np.abs(u - 0.5) < 0.05) & (v > 0.45)
        return [(trunk, _key(VEG, tint, D_DARK)), (crown, _key(VEG, tint))]

    return shape


class SceneGenerator:
    """Generates layouts and renders them per domain at a fixed resolution and seed."""

    def __init__(self, height: int, width: int, seed: int = 0):
        if height < 16 or width < 16:
            raise ValueError(f"synthetic resolution {height}x{width} is too small (min 16x16)")
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        # Noise banks are drawn once per generator; each image reads a seeded random window,
        # which is much cheaper than fresh full-size noise and still deterministic.
        rng = np.random.default_rng([self.seed, 7919])
        bh, bw = 2 * self.height, 2 * self.width
        self._grain = rng.standard_normal((3, bh, bw), dtype=np.float32)
        coarse = rng.standard_normal((bh // 8 + 2, bw // 8 + 2), dtype=np.float32)
        self._smooth = _upsample(coarse, bh, bw)
        self._smooth /= self._smooth.std() + 1e-6
        self._texture = 0.6 * self._smooth + 0.5 * self._grain[0]
        rows = (np.arange(self.height, dtype=np.float32) + 0.5) / self.height - 0.5
        cols = (np.arange(self.width, dtype=np.float32) + 0.5) / self.width - 0.5
        self._vignette = 1.0 - 0.25 * (rows[:, None] ** 2 + cols[None, :] ** 2)
        self._rain_bank: np.ndarray | None = None  # drawn on first use (see _rain, _snow)
        self._snow_bank: np.ndarray | None = None

    # ---- layout ----

    def layout(self, index: int, split: str = "train") -> SceneLayout:
        """The scene layout for (split, index); shared by every domain."""
        rng = np.random.default_rng([self.seed, _split_code(split), int(index)])
        h, w = self.height, self.width
        horizon = h * rng.uniform(0.36, 0.5)
        c = _Canvas(h, w, horizon, w * rng.uniform(0.4, 0.6), w * rng.uniform(0.55, 0.8))
        road_c = rng.uniform(-1.2, 1.2)
        road_hw = rng.uniform(3.5, 7.5)
        side_walk = (rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0))
        verge = tuple(rng.uniform(0.5, 4.0) if rng.random() < 0.35 else 0.0 for _ in range(2))
        facade_x = (
            road_c - road_hw - side_walk[0] - verge[0],
            road_c + road_hw + side_walk[1] + verge[1],
        )
        self._skyline(c, rng)
        self._ground(c, rng, road_c, road_hw, side_walk, verge)
        self._facades(c, rng, facade_x)
        self._objects(c, rng, road_c, road_hw, side_walk, facade_x)
        label = (c.key // (_N_TINT * 8)).astype(np.uint8)
        lights = np.asarray(c.lights, dtype=np.float32).reshape(-1, 4)
        return SceneLayout(label=label, key=c.key, depth=c.depth, lights=lights, horizon=horizon)

    def _skyline(self, c: _Canvas, rng: np.random.Generator) -> None:
        # Distant buildings and trees just above the horizon, seen where the street opens up.
        n = int(rng.integers(4, 12))
        edges = np.sort(rng.uniform(0, c.w, n - 1))
        seg = np.searchsorted(edges, np.arange(c.w) + 0.5)
        heights = rng.uniform(0.0, 0.14, n) * c.h
        classes = np.where(rng.random(n) < 0.6, BUILDING, VEG)
        # Only the band of rows the skyline can reach (the test below decides per pixel).
        r0 = max(int(np.floor(c.horizon - heights.max())) - 1, 0)
        r1 = min(int(np.ceil(c.horizon)) + 1, c.h)
        rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
        mask = (rows < c.horizon) & (rows > c.horizon - heights[seg][None, :])
        _paint(c.key[r0:r1], (classes[seg] * _N_TINT * 8 + 8 * 3)[None, :], mask)
        _paint(c.depth[r0:r1], 400.0, mask)

    def _ground(
        self,
        c: _Canvas,
        rng: np.random.Generator,
        road_c: float,
        road_hw: float,
        side_walk: tuple[float, float],
        verge: tuple[float, float],
    ) -> None:
        r0 = int(np.floor(c.horizon)) + 1
        if r0 >= c.h:
            return
        dy = np.arange(r0, c.h, dtype=np.float32)[:, None] + 0.5 - c.horizon
        z = c.cam_h * c.f / dy  # (R, 1)
        xw = (np.arange(c.w, dtype=np.float32)[None, :] + 0.5 - c.vx) * (z / c.f)
        rel = xw - road_c
        arel = np.abs(rel)
        road = arel < road_hw
        # Keys are built directly (class + per-row tint, then marks in the free detail bits)
        # with branch-free writes: boolean fancy indexing is several times slower.
        tint = (np.floor(z / 40.0) % 2).astype(np.uint16)  # subtle resurfacing patches
        key = np.empty(rel.shape, dtype=np.uint16)
        key[...] = (SIDEWALK * _N_TINT + tint) * 8
        _paint(key, (ROAD * _N_TINT + tint) * 8, road)
        terrain_key = (TERRAIN * _N_TINT + tint) * 8
        if verge[0] > 0:
            _paint(key, terrain_key, rel < -road_hw - side_walk[0])
        if verge[1] > 0:
            _paint(key, terrain_key, rel > road_hw + side_walk[1])
        line = 0.12
        dashed = (arel < line) & ((z % 9.0) < 4.5)
        dashed |= np.abs(arel - (road_hw - 0.3)) < line  # the road edges
        dashed &= road
        if rng.random() < 0.3:  # a zebra crossing
            zc = rng.uniform(8, 25)
            rows = ((z > zc) & (z < zc + 3.5))[:, 0]  # z is per row: only those rows
            stripes = xw[rows]
            stripes -= np.floor(stripes)  # == xw % 1.0, without the slow float remainder
            dashed[rows] |= road[rows] & (stripes < 0.5)
        key |= dashed * np.uint16(D_MARK)  # the detail bits are free on the ground
        c.key[r0:] = key
        c.depth[r0:] = np.broadcast_to(z, rel.shape)

    def _facades(self, c: _Canvas, rng: np.random.Generator, facade_x: tuple[float, float]) -> None:
        cols = np.arange(c.w, dtype=np.float32) + 0.5 - c.vx
        split = int(
            np.searchsorted(cols, 0.0)
        )  # columns left of the vanishing point see the left plane
        rows = np.arange(c.h, dtype=np.float32)[:, None] + 0.5
        for side, xs in enumerate(facade_x):
            sl = slice(0, split) if side == 0 else slice(split, c.w)
            zf = xs * c.f / cols[sl]  # depth where each column's ray meets the facade plane
            if zf.size == 0:
                continue
            # Blocks along the street: (end depth, low class, low height, high class, high height).
            ends, low_cls, low_h, high_cls, high_h, tints = [], [], [], [], [], []
            zpos, zmax = 0.0, rng.uniform(80, 250)
            while zpos < zmax:
                zpos += rng.uniform(8, 35)
                kind = rng.random()
                if kind < 0.62:
                    lc, lh, hc, hh = BUILDING, rng.uniform(6, 28), BUILDING, 0.0
                elif kind < 0.74:
                    lc, lh, hc, hh = VEG, rng.uniform(3, 12), VEG, 0.0
                elif kind < 0.87:
                    lc, lh = WALL, rng.uniform(1.0, 2.8)
                    hc, hh = (BUILDING, rng.uniform(6, 20)) if rng.random() < 0.6 else (VEG, 6.0)
                else:
                    lc, lh = FENCE, rng.uniform(1.0, 2.2)
                    hc, hh = (VEG, rng.uniform(3, 9)) if rng.random() < 0.6 else (BUILDING, 12.0)
                ends.append(zpos)
                low_cls.append(lc)
                low_h.append(lh)
                high_cls.append(hc)
                high_h.append(max(hh, lh))
                tints.append(int(rng.integers(0, _N_TINT)))
            period, floor_h = rng.uniform(2.5, 4.5), rng.uniform(2.8, 3.6)
            blk = np.searchsorted(np.asarray(ends), zf)
            valid = (blk < len(ends)) & (zf > 0.5)
            blk = np.minimum(blk, len(ends) - 1)
            scale = (c.f / np.maximum(zf, 1e-3)).astype(np.float32)
            # Per column, the facade is a run of rows: [t_high, t_low) high part, [t_low, bottom) low.
            bottom = np.where(valid, c.horizon + c.cam_h * scale, -1.0).astype(np.float32)
            t_low = (c.horizon - (np.asarray(low_h)[blk] - c.cam_h) * scale).astype(np.float32)
            t_high = (c.horizon - (np.asarray(high_h)[blk] - c.cam_h) * scale).astype(np.float32)
            lc = (np.asarray(low_cls)[blk] * _N_TINT + np.asarray(tints)[blk]) * 8
            hc = (np.asarray(high_cls)[blk] * _N_TINT + np.asarray(tints)[blk]) * 8
            r1 = min(int(np.ceil(bottom.max())), c.h)
            r0 = max(int(np.floor(t_high.min())), 0)
            if r1 <= r0:
                continue
            rr = rows[r0:r1]
            low_is = np.asarray(low_cls)[blk]
            high_is = np.asarray(high_cls)[blk]
            below = rr < bottom
            low = below & (rr >= t_low)
            mask = below & (rr >= t_high)  # low part or high part (t_high <= t_low)
            keys = np.empty(mask.shape, dtype=np.uint16)
            keys[...] = hc
            _paint(keys, lc, low)
            building = (low & (low_is == BUILDING)) | (~low & (high_is == BUILDING))
            # Windows: a grid in facade coordinates; some of them lit (used at night).
            y_up = c.cam_h - (rr - c.horizon) / scale
            gv = y_up * (1.0 / floor_h)
            floor_idx = np.floor(gv)
            fv = gv - floor_idx
            gu = zf / period
            col_win = (gu - np.floor(gu)) > 0.3
            win = building & col_win & (fv > 0.35) & (fv < 0.85) & (y_up > 1.0)
            # (7 u + 3 v) % 5 == 0 on the integer grid is the same as (v - u) % 5 == 0, tested
            # in float32 (exact for these small integers; integer % is slow).
            cell = floor_idx - np.floor(gu)
            lit = np.floor(cell * np.float32(0.2) + np.float32(0.5)) * np.float32(5.0) == cell
            keys += win * np.uint16(D_GLASS) + (win & lit) * np.uint16(D_LITWIN - D_GLASS)
            fence_gap = ((zf % 0.35) < 0.17) & (low_is == FENCE)
            gap = low & fence_gap & (y_up < np.asarray(low_h)[blk] - 0.1)
            keys += gap * np.uint16(D_DARK)
            _paint(c.key[r0:r1, sl], keys, mask)
            _paint(c.depth[r0:r1, sl], zf.astype(np.float32), mask)

    def _objects(
        self,
        c: _Canvas,
        rng: np.random.Generator,
        road_c: float,
        road_hw: float,
        side_walk: tuple[float, float],
        facade_x: tuple[float, float],
    ) -> None:
        items: list[tuple[float, Callable[[], None]]] = []
        curb = (road_c - road_hw, road_c + road_hw)
        walk_mid = (curb[0] - side_walk[0] / 2, curb[1] + side_walk[1] / 2)

        def add(z: float, fn: Callable[[], None]) -> None:
            items.append((z, fn))

        def on_walk(side: int) -> float:
            lo, hi = sorted(
                (curb[side], curb[side] + (side_walk[side] if side else -side_walk[side]))
            )
            return rng.uniform(lo + 0.3, hi - 0.3)

        # Vehicles: parked along both curbs and driving in the lanes.
        n_lane = rng.poisson(2.0)
        n_parked = rng.poisson(4.0)
        for i in range(n_lane + n_parked):
            parked = i >= n_lane
            side = int(rng.integers(0, 2))
            r = rng.random()
            cls = CAR if r < 0.86 else (TRUCK if r < 0.94 else BUS)
            width, height, length = {
                CAR: (1.8, rng.uniform(1.4, 1.7), 4.5),
                TRUCK: (2.4, rng.uniform(2.8, 3.6), 7.5),
                BUS: (2.5, 3.1, 11.0),
            }[cls]
            if parked:
                xc = curb[side] + (1.2 if side == 0 else -1.2)
            else:
                lane = road_hw / 2
                xc = road_c + (-lane if side == 0 else lane) * rng.uniform(0.6, 1.1)
            z0 = rng.uniform(4.0, 70.0)
            tint = int(rng.integers(0, _N_TINT))
            facing = side == 0 and not parked  # oncoming traffic shows headlights
            add(z0, self._vehicle(c, xc, z0, width, height, length, cls, tint, facing))
        if (
            rng.random() < 0.1
        ):  # a tram in the middle of the street (rare, like trains in Cityscapes)
            z0 = rng.uniform(12.0, 50.0)
            xc = road_c + rng.uniform(-1.0, 1.0)
            add(z0, self._vehicle(c, xc, z0, 2.6, 3.5, 28.0, TRAIN, int(rng.integers(0, 4)), True))
        # People on the sidewalks; a few riders on the road edge.
        for _ in range(rng.poisson(5.0)):
            side = int(rng.integers(0, 2))
            x, z = on_walk(side), rng.uniform(2.5, 35.0)
            tint, hgt, stride = (
                int(rng.integers(0, _N_TINT)),
                rng.uniform(1.55, 1.95),
                rng.uniform(0, 0.5),
            )
            add(z, self._person(c, x, z, hgt, tint, stride, PERSON))
        for _ in range(rng.poisson(0.3)):
            side = int(rng.integers(0, 2))
            x = curb[side] + (0.8 if side == 0 else -0.8)
            z = rng.uniform(4.0, 35.0)
            motor = rng.random() < 0.4
            tint = int(rng.integers(0, _N_TINT))
            add(z, self._rider(c, x, z, tint, motor))
        for _ in range(rng.poisson(1.5)):  # parked bicycles and motorcycles
            side = int(rng.integers(0, 2))
            motor = rng.random() < 0.3
            x, z = on_walk(side), rng.uniform(3.0, 30.0)
            cls = MOTO if motor else BIKE
            shape = _bike_shapes(cls, int(rng.integers(0, _N_TINT)), motor)
            add(z, lambda x=x, z=z, s=shape, m=motor: c.sprite(x, z, 1.8, 1.1 if m else 1.0, s))
        # Poles with lamps, signs and traffic lights near the curbs.
        for side in (0, 1):
            zpos = rng.uniform(3.0, 12.0)
            spacing = rng.uniform(10.0, 25.0)
            while zpos < 90.0:
                x = curb[side] + (-0.4 if side == 0 else 0.4)
                add(zpos, self._pole(c, rng, x, zpos, side))
                zpos += spacing * rng.uniform(0.7, 1.3)
        # Trees on the sidewalk or verge.
        for _ in range(rng.poisson(2.0)):
            side = int(rng.integers(0, 2))
            x = (walk_mid[side] + facade_x[side]) / 2 if rng.random() < 0.5 else walk_mid[side]
            z = rng.uniform(4.0, 60.0)
            hgt = rng.uniform(4.0, 9.0)
            shape = _tree_shape(int(rng.integers(0, _N_TINT)), rng.uniform(0, 6.28))
            add(z, lambda x=x, z=z, hgt=hgt, s=shape: c.sprite(x, z, hgt * 0.6, hgt, s))
        for _, fn in sorted(items, key=lambda item: -item[0]):
            fn()

    def _vehicle(
        self,
        c: _Canvas,
        xc: float,
        z0: float,
        width: float,
        height: float,
        length: float,
        cls: int,
        tint: int,
        facing: bool,
    ) -> Callable[[], None]:
        glass_lo = {CAR: 0.55, TRUCK: 0.55, BUS: 0.35, TRAIN: 0.35}[cls]
        light = D_HEAD if facing else D_TAIL

        # Detail codes as sums of disjoint masks (lamps cut into the window band): cheaper
        # than masked writes.
        def rear(v: np.ndarray, u: np.ndarray) -> np.ndarray:
            du = np.abs(u - 0.5)
            lamp = (v > 0.6) & (v < 0.72) & (du > 0.36)
            glass = (v > 0.1) & (v < 1.0 - glass_lo) & (du < 0.4) & ~lamp
            dark = (v > 0.86) & (du > 0.3)
            return glass * np.uint16(D_GLASS) + lamp * np.uint16(light) + dark * np.uint16(D_DARK)

        def side(hn: np.ndarray, t: np.ndarray) -> np.ndarray:
            glass = (hn > glass_lo) & (hn < 0.9) & (((t * length) % 2.2) > 0.25)
            wheel = (hn < 0.28) & ((np.abs(t - 0.15) < 0.08) | (np.abs(t - 0.85) < 0.08))
            return glass * np.uint16(D_GLASS) + wheel * np.uint16(D_DARK)

        def draw() -> None:
            x0, x1 = xc - width / 2, xc + width / 2
            c.box(x0, x1, z0, z0 + length, height, cls, tint, rear, side)
            if z0 > 2.0:
                for dx in (-0.38 * width, 0.38 * width):
                    y, x = c.project(xc + dx, z0, 0.33 * height)
                    c.lights.append((y, x, max(0.35 * c.f / z0, 0.8), L_HEAD if facing else L_TAIL))

        return draw

    def _person(
        self,
        c: _Canvas,
        x: float,
        z: float,
        hgt: float,
        tint: int,
        stride: float,
        cls: int,
        y_up: float = 0.0,
    ) -> Callable[[], None]:
        def shape(v: np.ndarray, u: np.ndarray):
            body = _person_mask(v, u, stride)
            return [
                (body & (v < 0.55), _key(cls, tint)),
                (body & (v >= 0.55), _key(cls, tint, D_DARK)),
            ]

        return lambda: c.sprite(x, z, hgt * 0.3, hgt, shape, y_up)

    def _rider(self, c: _Canvas, x: float, z: float, tint: int, motor: bool) -> Callable[[], None]:
        cls = MOTO if motor else BIKE
        bike = _bike_shapes(cls, tint, motor)
        person = self._person(c, x, z, 1.45, tint, 0.15, RIDER, y_up=0.55)

        def draw() -> None:
            c.sprite(x, z, 1.8, 1.1 if motor else 1.0, bike)
            person()

        return draw

    def _pole(
        self, c: _Canvas, rng: np.random.Generator, x: float, z: float, side: int
    ) -> Callable[[], None]:
        hgt = rng.uniform(4.0, 8.0)
        thick = rng.uniform(0.12, 0.25)
        r = rng.random()
        tint = int(rng.integers(0, _N_TINT))
        pole = _key(POLE, tint)

        def draw() -> None:
            c.sprite(x, z, thick, hgt, pole)
            if r < 0.45:  # street lamp head overhanging the road
                arm = 1.2 if side == 0 else -1.2
                c.sprite(x + arm / 2, z, abs(arm), 0.15, pole, y_up=hgt - 0.15)
                c.sprite(x + arm, z, 0.5, 0.2, _key(POLE, tint, D_LAMP), y_up=hgt - 0.35)
                y, xi = c.project(x + arm, z, hgt - 0.3)
                c.lights.append((y, xi, max(0.6 * c.f / z, 1.0), L_LAMP))
            elif r < 0.8:  # traffic sign: disc or plate
                disc = r < 0.62

                def sign(v: np.ndarray, u: np.ndarray):
                    m = (np.hypot(u - 0.5, v - 0.5) < 0.5) if disc else np.ones((1, 1), bool)
                    rim = np.hypot(u - 0.5, v - 0.5) > 0.38 if disc else (np.abs(v - 0.5) > 0.38)
                    return [(m, _key(SIGN, tint)), (m & rim, _key(SIGN, tint, D_MARK))]

                c.sprite(x, z - 0.05, 0.7, 0.7, sign, y_up=hgt * 0.45)
            else:  # traffic light

                def signal(v: np.ndarray, u: np.ndarray):
                    body = np.ones((1, 1), dtype=bool)
                    lamp = (np.abs(u - 0.5) < 0.25) & ((v * 3 % 1.0) > 0.2) & ((v * 3 % 1.0) < 0.8)
                    return [(body, _key(LIGHT, tint)), (lamp, _key(LIGHT, tint, D_LAMP))]

                top = hgt - 1.0
                c.sprite(x, z - 0.05, 0.35, 1.0, signal, y_up=top)
                y, xi = c.project(x, z, top + 0.5)
                c.lights.append((y, xi, max(0.3 * c.f / z, 0.8), L_SIGNAL))

        return draw

    # ---- rendering ----

    def render(
        self, layout: SceneLayout, domain: str, index: int, split: str = "train"
    ) -> np.ndarray:
        """Render `layout` in `domain`'s appearance as an (H, W, 3) uint8 image."""
        if domain not in _DOMAIN_CODE:
            raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")
        code = 100 + _DOMAIN_CODE[domain]
        rng = np.random.default_rng([self.seed, _split_code(split), int(index), code])
        h, w = self.height, self.width
        oy, ox = int(rng.integers(0, h)), int(rng.integers(0, w))
        # Channel-first float32, updated in place: every full-image pass costs about as much as
        # the arithmetic it does, so the passes are few and per-pixel factors are 2D planes
        # that broadcast over the channels.
        lut = _palette_lut(domain, rng)
        gathered = np.take(lut, layout.key, axis=1)  # (4, H, W): rgb + texture amplitude
        img, amp = gathered[:3], gathered[3]
        factor = self._shading(layout)
        if domain == "game":  # flat, saturated, sharp
            img *= factor
            return _to_uint8(img)
        amp *= self._texture[oy : oy + h, ox : ox + w]  # surface texture: 1 + amp * texture
        amp += 1.0
        factor *= amp
        factor *= self._vignette
        img *= factor
        if domain == "night":
            self._night(img, layout, rng)
        _blur(img)
        if domain in ("fog", "rain", "snow"):
            beta, air = {
                "fog": (rng.uniform(0.025, 0.06), rng.uniform(0.72, 0.85)),
                "rain": (0.012, 0.45),
                "snow": (0.02, 0.8),
            }[domain]
            _haze(img, layout.depth, beta, air)
        if domain == "rain":
            self._rain(img, rng)
        elif domain == "snow":
            self._snow(img, rng)
        sigma = {"real": 0.012, "fog": 0.01, "night": 0.03, "rain": 0.02, "snow": 0.015}[domain]
        # Sensor noise: the grain bank with its channels reversed, so it differs from the
        # texture (which used grain channel 0 at the same window).
        noise = self._grain[::-1, oy : oy + h, ox : ox + w] * np.float32(sigma)
        img += noise
        return _to_uint8(img)

    def _shading(self, layout: SceneLayout) -> np.ndarray:
        """(H, W) brightness: surfaces darken a little with distance, the sky brightens
        towards the horizon."""
        h = self.height
        # 1 - 0.12 d / (d + 30) rewritten as 0.88 + 3.6 / (d + 30): two passes instead of four.
        factor = layout.depth + np.float32(30.0)
        np.divide(np.float32(3.6), factor, out=factor)
        factor += np.float32(0.88)
        rows = (np.arange(h, dtype=np.float32) + 0.5) / h
        grad = 0.35 * np.clip(rows - layout.horizon / h + 0.25, 0, 1)
        sky_row = (np.float32(1.0 - 0.12 * 3000.0 / 3030.0 + 0.12) + grad)[:, None]
        _paint(factor, sky_row, layout.depth >= SKY_DEPTH)
        return factor

    def _night(self, img: np.ndarray, layout: SceneLayout, rng: np.random.Generator) -> None:
        h = self.height
        colors = {
            L_LAMP: np.array([1.0, 0.75, 0.4], np.float32)[:, None, None],
            L_HEAD: np.array([1.0, 0.95, 0.85], np.float32)[:, None, None],
            L_TAIL: np.array([0.9, 0.1, 0.05], np.float32)[:, None, None],
            L_SIGNAL: np.array([0.2, 0.9, 0.4], np.float32)[:, None, None],
        }
        gain = np.float32(rng.uniform(0.7, 1.0))
        cap = 0.02 * h  # near lights would otherwise flood the frame
        for y, x, r, kind in layout.lights.tolist():
            rad = min(r * (2.5 if kind == L_LAMP else 1.5), cap)
            strength = gain * (0.9 if kind == L_LAMP else 0.6)
            _add_glow(img, y, x, 3 * rad, 3 * rad, rad, rad, strength, colors[int(kind)])
            if kind == L_LAMP:  # a pool of light on the ground below the lamp
                below = layout.horizon + (y - layout.horizon) * -0.3 if y < layout.horizon else y
                cy = max(below, layout.horizon) + 6 * rad
                _add_glow(
                    img, cy, x, 4 * rad, 8 * rad, 2 * rad, 4 * rad, 0.12 * gain, colors[L_LAMP]
                )

    def _rain(self, img: np.ndarray, rng: np.random.Generator) -> None:
        # Streaks come from a bank drawn once per generator (one per slant): smearing fresh
        # drops per image cost more than the rest of the rendering.
        if self._rain_bank is None:
            self._rain_bank = _streak_bank(2 * self.height, 2 * self.width, self.seed)
        h, w = self.height, self.width
        slant = int(rng.integers(0, len(self._rain_bank)))
        oy, ox = int(rng.integers(0, h)), int(rng.integers(0, w))
        alpha = self._rain_bank[slant, oy : oy + h, ox : ox + w] * np.float32(rng.uniform(0.8, 1.2))
        _overlay(img, alpha, 0.85)

    def _snow(self, img: np.ndarray, rng: np.random.Generator) -> None:
        if self._snow_bank is None:
            self._snow_bank = _flake_bank(2 * self.height, 2 * self.width, self.seed)
        h, w = self.height, self.width
        oy, ox = int(rng.integers(0, h)), int(rng.integers(0, w))
        _overlay(img, self._snow_bank[oy : oy + h, ox : ox + w], 0.95)

    def sample(
        self, index: int, domain: str, split: str = "train"
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, label (H, W) uint8 train ids) of scene `index` in `domain`."""
        layout = self.layout(index, split)
        return self.render(layout, domain, index, split), layout.label


def _split_code(split: str) -> int:
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(_SPLIT_CODE)}")
    return _SPLIT_CODE[split]


# Natural base colors per class (0..1 RGB) and texture strength.
_BASE = np.array(
    [
        (0.36, 0.36, 0.38),
        (0.62, 0.58, 0.55),
        (0.55, 0.47, 0.42),
        (0.62, 0.6, 0.52),
        (0.45, 0.38, 0.3),
        (0.45, 0.46, 0.48),
        (0.2, 0.2, 0.18),
        (0.85, 0.75, 0.1),
        (0.22, 0.45, 0.15),
        (0.45, 0.6, 0.25),
        (0.45, 0.65, 0.92),
        (0.5, 0.3, 0.35),
        (0.6, 0.25, 0.2),
        (0.6, 0.6, 0.62),
        (0.75, 0.72, 0.65),
        (0.85, 0.55, 0.15),
        (0.75, 0.75, 0.78),
        (0.3, 0.3, 0.35),
        (0.25, 0.35, 0.6),
    ],
    dtype=np.float32,
)
_TEXTURE = np.array(
    [
        0.10,
        0.08,
        0.10,
        0.12,
        0.10,
        0.05,
        0.03,
        0.03,
        0.30,
        0.25,
        0.0,
        0.08,
        0.08,
        0.03,
        0.05,
        0.05,
        0.05,
        0.05,
        0.05,
    ],
    dtype=np.float32,
)
_VEHICLE_PAINT = np.array(
    [
        (0.85, 0.85, 0.85),
        (0.08, 0.08, 0.09),
        (0.6, 0.6, 0.62),
        (0.4, 0.4, 0.42),
        (0.7, 0.1, 0.1),
        (0.1, 0.2, 0.55),
        (0.05, 0.1, 0.3),
        (0.15, 0.35, 0.2),
        (0.85, 0.7, 0.1),
        (0.9, 0.9, 0.92),
        (0.25, 0.25, 0.27),
        (0.5, 0.45, 0.4),
        (0.55, 0.05, 0.1),
        (0.3, 0.5, 0.7),
        (0.95, 0.95, 0.95),
        (0.12, 0.12, 0.14),
    ],
    dtype=np.float32,
)
_DRESS = _VEHICLE_PAINT[::-1] * 0.8


def _palette_lut(domain: str, rng: np.random.Generator) -> np.ndarray:
    """The (key -> rgb + texture amplitude) table of one image in one domain."""
    base = np.broadcast_to(_BASE[:, None, :], (NUM_CLASSES, _N_TINT, 3)).copy()
    jitter = rng.uniform(-0.12, 0.12, (NUM_CLASSES, _N_TINT, 1)).astype(np.float32)
    base *= 1.0 + jitter
    for cls in (CAR, TRUCK, BUS, MOTO, BIKE):
        base[cls] = _VEHICLE_PAINT
    base[TRUCK] = 0.5 * base[TRUCK] + 0.5 * _BASE[TRUCK]
    base[PERSON] = _DRESS
    base[RIDER] = 0.5 * _DRESS + 0.5 * _BASE[RIDER]
    base[SKY] = _BASE[SKY]
    gray = base.mean(axis=-1, keepdims=True)
    if domain == "game":
        base = np.clip(gray + 1.45 * (base - gray), 0, 1) * 1.05  # saturated, bright
    else:
        # A different camera palette: duller colors and a per-image white balance.
        balance = np.array([rng.uniform(0.9, 1.1), 1.0, rng.uniform(0.9, 1.1)], np.float32)
        base = (gray + 0.7 * (base - gray)) * balance
        base[SKY] = np.array([0.72, 0.78, 0.85], np.float32) * rng.uniform(0.9, 1.05)
        base[ROAD] = base[ROAD] * 0.85
    if domain == "rain":
        base = 0.7 * base
        base[SKY] = np.array([0.55, 0.57, 0.6], np.float32)
    elif domain == "snow":
        # Snow lies on the ground and on the trees (texture breaks it up per pixel).
        for cls, amount in ((ROAD, 0.7), (SIDEWALK, 0.8), (TERRAIN, 0.85), (VEG, 0.35), (CAR, 0.2)):
            base[cls] += amount * (0.92 - base[cls])
        base[SKY] = np.array([0.85, 0.86, 0.88], np.float32)
    elif domain == "fog":
        base[SKY] = np.array([0.8, 0.8, 0.8], np.float32)
    # detail variants: (class, tint, detail)
    lut = np.empty((NUM_CLASSES, _N_TINT, 8, 4), dtype=np.float32)
    lut[..., :3] = base[:, :, None, :]
    lut[..., 3] = 0.0 if domain == "game" else _TEXTURE[:, None, None]
    night = domain == "night"
    lut[:, :, D_MARK, :3] = (0.92, 0.92, 0.88)
    if night:
        lut[..., :3] *= 0.15
        lut[SKY, :, :, :3] = (0.02, 0.025, 0.05)
        lut[:, :, D_MARK, :3] = (0.12, 0.12, 0.11)
    lut[:, :, D_GLASS, :3] = lut[:, :, D_NONE, :3] * 0.25 + (0.01 if night else 0.1)
    lut[:, :, D_DARK, :3] = lut[:, :, D_NONE, :3] * 0.3
    lut[:, :, D_LAMP, :3] = (1.0, 0.9, 0.6) if night else (0.75, 0.75, 0.7)
    lut[:, :, D_LITWIN, :3] = (0.9, 0.7, 0.4) if night else lut[:, :, D_GLASS, :3]
    lut[:, :, D_HEAD, :3] = (1.0, 1.0, 0.95) if night else (0.85, 0.85, 0.8)
    lut[:, :, D_TAIL, :3] = (1.0, 0.1, 0.05) if night else (0.7, 0.08, 0.05)
    lut[:, :, (D_LAMP, D_HEAD, D_TAIL), 3] = 0.0
    return np.ascontiguousarray(lut.reshape(-1, 4).T)


def _blur(img: np.ndarray) -> None:
    """In-place separable [1, 2, 1] / 4 blur of a (C, H, W) image (the outermost pixels kept).

    Per axis, [1, 2, 1] is two [1, 1] box sums: two additions instead of a copy and four
    passes; the normalization is one multiply at the end.
    """
    pair = np.empty_like(img)
    np.add(img[:, :-1], img[:, 1:], out=pair[:, :-1])  # rows i + (i + 1)
    np.add(pair[:, :-2], pair[:, 1:-1], out=img[:, 1:-1])
    img[:, (0, -1)] *= 4.0
    np.add(img[:, :, :-1], img[:, :, 1:], out=pair[:, :, :-1])  # columns j + (j + 1)
    np.add(pair[:, :, :-2], pair[:, :, 1:-1], out=img[:, :, 1:-1])
    img[:, :, (0, -1)] *= 4.0
    img *= np.float32(1.0 / 16.0)


def _haze(img: np.ndarray, depth: np.ndarray, beta: float, air: float) -> None:
    """In-place depth-dependent haze: I t + A (1 - t) with transmission t = exp(-beta d)."""
    # Clamp the exponent: float32 denormals near exp(-100) are very slow on CPUs.
    t = np.multiply(depth, np.float32(-beta))
    np.maximum(t, np.float32(-15.0), out=t)
    np.exp(t, out=t)
    img *= t
    t *= np.float32(-air)  # A (1 - t) = A - A t
    t += np.float32(air)
    img += t


def _overlay(img: np.ndarray, alpha: np.ndarray, value: float) -> None:
    """In-place blend towards a gray `value` with per-pixel opacity `alpha` (H, W)."""
    img *= 1.0 - alpha
    img += np.float32(value) * alpha


def _add_glow(
    img: np.ndarray,
    y: float,
    x: float,
    half_h: float,
    half_w: float,
    sigma_y: float,
    sigma_x: float,
    strength: float,
    color: np.ndarray,
) -> None:
    """Add an axis-aligned Gaussian glow of `color` centred at (y, x), clipped to the image."""
    h, w = img.shape[1:]
    r0, r1 = max(int(y - half_h), 0), min(int(y + half_h) + 1, h)
    c0, c1 = max(int(x - half_w), 0), min(int(x + half_w) + 1, w)
    if r1 <= r0 or c1 <= c0:
        return
    # Separable: exp(a + b) = exp(a) exp(b), so only a row and a column are exponentiated.
    gy = np.exp(-((np.arange(r0, r1, dtype=np.float32) - y) ** 2) / (2 * sigma_y * sigma_y))
    gx = np.exp(-((np.arange(c0, c1, dtype=np.float32) - x) ** 2) / (2 * sigma_x * sigma_x))
    img[:, r0:r1, c0:c1] += (np.float32(strength) * gy[:, None] * gx[None, :]) * color


def _streak_bank(height: int, width: int, seed: int) -> np.ndarray:
    """(S, height, width) rain opacity: random drops smeared into streaks, one map per slant."""
    rng = np.random.default_rng([seed, 7927])
    n = int(0.004 * height * width)
    bank = np.zeros((len(_RAIN_SLANTS), height, width), dtype=np.float32)
    for streak, slant in zip(bank, _RAIN_SLANTS, strict=True):
        streak[rng.integers(0, height, n), rng.integers(0, width, n)] = rng.uniform(0.3, 1.0, n)
        # Smear by repeated doubling: log2(length) shifted additions.
        k = 1
        while k < max(int(0.025 * height), 2):  # the bank is twice the image height
            dy, dx = k, int(round(k * slant))
            src = streak[: height - dy, max(-dx, 0) : width - max(dx, 0)].copy()
            streak[dy:, max(dx, 0) : width - max(-dx, 0)] += src
            k *= 2
        np.minimum(np.float32(0.35) * streak, np.float32(0.6), out=streak)
    return bank


def _flake_bank(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width) snow opacity: random flakes, each a small soft blob."""
    rng = np.random.default_rng([seed, 7933])
    flakes = np.zeros((height, width), dtype=np.float32)
    n = int(0.003 * height * width)
    flakes[rng.integers(0, height - 1, n), rng.integers(0, width - 1, n)] = 1.0
    flakes[1:, :] += flakes[:-1, :] * 0.7
    flakes[:, 1:] += flakes[:, :-1] * 0.7
    return np.minimum(flakes, 1.0) * np.float32(0.8)


def _upsample(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small 2D array to (height, width)."""
    ys = np.linspace(0, a.shape[0] - 1, height, dtype=np.float32)
    xs = np.linspace(0, a.shape[1] - 1, width, dtype=np.float32)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, a.shape[0] - 1), np.minimum(x0 + 1, a.shape[1] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bot = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    img *= 255.0
    img += 0.5
    np.clip(img, 0, 255, out=img)
    u8 = img.astype(np.uint8)
    return np.stack([u8[0], u8[1], u8[2]], axis=-1)  # much faster than a transposed copy


def sample_grid(
    generator: SceneGenerator, index: int, domains: tuple[str, ...] = DOMAINS, split: str = "val"
) -> np.ndarray:
    """One scene in every domain (rows) beside its colored label map, as one uint8 image."""
    layout = generator.layout(index, split)
    color = colorize(layout.label)
    rows = [
        np.concatenate([generator.render(layout, d, index, split), color], axis=1) for d in domains
    ]
    return np.concatenate(rows, axis=0)
