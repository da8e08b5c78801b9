"""The random anatomy of one phantom and the soft shapes (masks in [0, 1]) drawn from it.

All geometry is in image-relative units (x, y in [0, 1], y down) so one phantom renders the same at any size;
`Grid.edge` is the width of a soft edge, never under about one pixel.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from llmcxr_jax.data.phantom.findings import CTR_GRADES, CTR_NORMAL, Finding

# Patient right is image left.
SIDE_SIGN = {"right": -1.0, "left": 1.0}
MEDIASTINUM_HALF_WIDTH = 0.06  # lung fields start this far from the midline


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Body habitus, inspiration, heart size, positioning and exposure of one radiograph."""

    midline: float  # x of the spine
    half_width: float  # midline to the inner rib margin at its widest (body size)
    apex: float  # y of the lung apices
    dome: dict  # side -> y of the top of the hemidiaphragm (inspiration); the right sits higher
    recess: float  # depth of the costophrenic recesses below the domes
    ctr: float  # cardiothoracic ratio
    heart_height: float
    heart_tilt: float  # radians, long axis toward the patient's left
    angle: float  # radians, patient rotation in the image plane
    gamma: float
    contrast: float
    brightness: float
    noise: float  # std of the per-pixel noise, in display units
    rib_count: float  # rib periods between apex and costophrenic angle
    gastric_bubble: bool

    def base(self, side: str) -> float:
        """y of the costophrenic angle on `side`."""
        return self.dome[side] + self.recess

    @property
    def carina(self) -> float:
        return self.apex + 0.16

    def hilum(self, side: str) -> tuple[float, float]:
        return self.midline + SIDE_SIGN[side] * 0.1, self.dome["right"] - 0.17

    @property
    def heart(self) -> tuple[float, float, float, float]:
        """Heart ellipse (x, y, horizontal semi-axis, vertical semi-axis), sized so its width is ctr x thorax width."""
        width = self.ctr * 2 * self.half_width
        b = self.heart_height
        s, c = np.sin(self.heart_tilt), np.cos(self.heart_tilt)
        a = np.sqrt(max((width / 2) ** 2 - (b * s) ** 2, 1e-4)) / c
        return self.midline + 0.17 * width, self.dome["right"] - 0.3 * b, float(a), b


def sample_anatomy(rng: np.random.Generator, findings: tuple[Finding, ...]) -> Anatomy:
    """Natural variation; the heart size follows the cardiomegaly grade, if any."""
    grade = next((f.severity for f in findings if f.kind == "cardiomegaly"), None)
    ctr = rng.uniform(*(CTR_GRADES[grade] if grade else CTR_NORMAL))
    dome_right = rng.uniform(0.63, 0.74)
    return Anatomy(
        midline=0.5 + rng.uniform(-0.015, 0.015),
        half_width=rng.uniform(0.34, 0.41),
        apex=rng.uniform(0.10, 0.145),
        dome={"right": dome_right, "left": dome_right + rng.uniform(0.015, 0.04)},
        recess=rng.uniform(0.05, 0.08),
        ctr=float(ctr),
        heart_height=rng.uniform(0.14, 0.16) + 0.25 * (ctr - 0.45),
        heart_tilt=np.deg2rad(rng.uniform(25, 40)),
        angle=np.deg2rad(rng.uniform(-3, 3)),
        gamma=rng.uniform(0.85, 1.2),
        contrast=rng.uniform(0.85, 1.15),
        brightness=rng.uniform(-0.05, 0.05),
        noise=rng.uniform(0.008, 0.03),
        rib_count=rng.uniform(8.5, 10),
        gastric_bubble=bool(rng.random() < 0.7),
    )


@dataclasses.dataclass(frozen=True)
class Grid:
    """Pixel-centre coordinates, rotated into the patient's frame."""

    x: np.ndarray
    y: np.ndarray
    edge: float
    pixel: float
    angle: float

    def window(self, centre: tuple[float, float], radius: float) -> tuple[slice, slice]:
        """Pixel rows and columns that hold every point within `radius` of `centre` (patient frame)."""
        size = self.x.shape[0]
        px, py = centre[0] - 0.5, centre[1] - 0.5
        c, s = np.cos(self.angle), np.sin(self.angle)
        col, row = c * px - s * py + 0.5, s * px + c * py + 0.5
        r = radius + 2 * self.edge

        def span(v):
            lo, hi = np.floor((v - r) * size), np.ceil((v + r) * size)
            return slice(int(np.clip(lo, 0, size)), int(np.clip(hi, 0, size)))

        return span(row), span(col)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    c.flags.writeable = False
    return c


def make_grid(size: int, angle: float) -> Grid:
    c = _pixel_centres(size)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    x = c[None, :] * cos + c[:, None] * sin + 0.5
    y = c[:, None] * cos - c[None, :] * sin + 0.5
    pixel = 1.0 / size
    return Grid(x=x, y=y, edge=max(0.004, 1.2 * pixel), pixel=pixel, angle=angle)


def ramp(z: np.ndarray) -> np.ndarray:
    """Soft step: 0 below -0.5, 1 above 0.5 (z in edge widths); a cheap sigmoid."""
    return np.clip(z + 0.5, 0.0, 1.0)


def lateral_edge(anatomy: Anatomy, side: str, y: np.ndarray) -> np.ndarray:
    """Distance of the lateral lung margin from the midline: narrow at the apex, widest at the base."""
    t = np.clip((y - anatomy.apex) / (anatomy.base(side) - anatomy.apex), 0.0, 1.0)
    return anatomy.half_width * (0.5 + 0.5 * np.sqrt(t))


def lung_mask(anatomy: Anatomy, side: str, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """One lung field: rounded apex, curved lateral wall, diaphragm dome with sharp costophrenic angle."""
    u = SIDE_SIGN[side] * (x - anatomy.midline)
    inner = MEDIASTINUM_HALF_WIDTH
    outer = lateral_edge(anatomy, side, y)
    apex_centre = inner + 0.27 * anatomy.half_width
    top = anatomy.apex + 1.6 * (u - apex_centre) ** 2
    return (ramp((u - inner) / edge) * ramp((outer - u) / edge)
            * ramp((y - top) / edge) * ramp((diaphragm(anatomy, side, u) - y) / edge))


def diaphragm(anatomy: Anatomy, side: str, u: np.ndarray) -> np.ndarray:
    """y of the hemidiaphragm `u` from the midline: flat medially, curving down to the costophrenic angle."""
    centre = 0.5 * (MEDIASTINUM_HALF_WIDTH + anatomy.half_width)
    return anatomy.dome[side] + anatomy.recess * (np.maximum(u - centre, 0) / (anatomy.half_width - centre)) ** 2


def ellipse_mask(g: Grid, centre, axes, tilt: float = 0.0) -> np.ndarray:
    """Soft filled ellipse rotated by `tilt` (radians), computed only in its window.

    The edge uses 1 - r^2 ~ 2 (1 - r) to skip a square root.
    """
    mask = np.zeros(g.x.shape, np.float32)
    win = g.window(centre, max(axes))
    dx, dy = g.x[win] - centre[0], g.y[win] - centre[1]
    c, s = np.cos(tilt), np.sin(tilt)
    p, q = (c * dx + s * dy) / axes[0], (-s * dx + c * dy) / axes[1]
    mask[win] = ramp((1.0 - (p * p + q * q)) * (0.5 * min(axes) / g.edge))
    return mask


def box_mask(g: Grid, centre, half_sizes) -> np.ndarray:
    """Soft rounded rectangle (a superellipse of power 4), computed only in its window."""
    mask = np.zeros(g.x.shape, np.float32)
    win = g.window(centre, float(np.hypot(*half_sizes)))
    p, q = (g.x[win] - centre[0]) / half_sizes[0], (g.y[win] - centre[1]) / half_sizes[1]
    p, q = p * p, q * q
    mask[win] = ramp((1.0 - (p * p + q * q)) * (0.25 * min(half_sizes) / g.edge))
    return mask


def polyline_mask(g: Grid, points, width: float) -> np.ndarray:
    """Soft band of `width` around a polyline (tubes, catheters, leads), computed only in its window."""
    p = np.asarray(points, dtype=np.float32)
    lo, hi = p.min(axis=0), p.max(axis=0)
    win = g.window(tuple((lo + hi) / 2), float(np.hypot(*(hi - lo))) / 2 + width)
    x, y = g.x[win], g.y[win]
    dist = np.full(x.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(p[:-1], p[1:]):
        ex, ey = bx - ax, by - ay
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        np.minimum(dist, np.hypot(x - ax - t * ex, y - ay - t * ey), out=dist)
    mask = np.zeros(g.x.shape, np.float32)
    mask[win] = ramp((width / 2 - dist) / g.edge)
    return mask


@functools.lru_cache(maxsize=16)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """(size, cells + 1) bilinear interpolation weights from a lattice to pixels."""
    pos = np.linspace(0, cells, size)
    w = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells + 1)[None, :])).astype(np.float32)
    w.flags.writeable = False
    return w


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise of unit scale: a random `cells` x `cells` lattice stretched bilinearly over `shape`."""
    rows, cols = _upsampler(shape[0], cells), _upsampler(shape[1], cells)
    return rows @ rng.standard_normal((cells + 1, cells + 1)).astype(np.float32) @ cols.T
