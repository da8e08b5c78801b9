"""Render one phantom radiograph: normal chest anatomy, then the findings, then exposure and noise.

Intensities are composed in display units (0 black, 1 white): soft tissue and opaque structures are laid *over*
(replacing what is beneath), bones are *added* (they show through everything), as on a real film. Findings are drawn
large on purpose so that they survive VQ-GAN compression to an 8x8 or 16x16 code grid.
"""
from __future__ import annotations

import numpy as np

from llmcxr_jax.data.phantom.anatomy import (SIDE_SIGN, Anatomy, Grid, box_mask, diaphragm, ellipse_mask,
                                             lateral_edge, lung_mask, make_grid, polyline_mask, ramp, smooth_noise)
from llmcxr_jax.data.phantom.findings import DEVICE_KINDS, SIDES, SIZES, Finding

AIR, SOFT, ABDOMEN, LUNG, HEART, FLUID, METAL = 0.04, 0.5, 0.72, 0.24, 0.73, 0.66, 0.97


def over(img: np.ndarray, mask: np.ndarray, value) -> np.ndarray:
    return img + mask * (value - img)


def _body(g: Grid, a: Anatomy) -> np.ndarray:
    """Neck widening into shoulders and trunk on an air background; dense abdomen under the diaphragm."""
    t = np.clip((g.y - (a.apex - 0.1)) / 0.09, 0.0, 1.0)
    dx = g.x - a.midline
    trunk = ramp((0.1 + (a.half_width + 0.1) * np.sqrt(t) - np.abs(dx)) / g.edge)
    dome = np.where(dx < 0, diaphragm(a, "right", -dx), diaphragm(a, "left", dx))
    img = over(np.full(g.x.shape, AIR, np.float32), trunk, SOFT)
    return over(img, trunk * ramp((g.y - dome) / g.edge), ABDOMEN)


def _lung_markings(rng: np.random.Generator, g: Grid, a: Anatomy) -> np.ndarray:
    """Vessels fanning out from each hilum, fading toward the periphery, plus the hilar shadows themselves.

    Computed only in the window around both lungs (the costliest layer of the image).
    """
    top, bottom = a.apex, max(a.base(side) for side in SIDES)
    win = g.window((a.midline, (top + bottom) / 2), max(a.half_width, (bottom - top) / 2))
    x, y = g.x[win], g.y[win]
    (rx, hy), (lx, _) = a.hilum("right"), a.hilum("left")
    dx = x - np.where(x < a.midline, rx, lx)
    dy = y - hy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, np.abs(dx))
    streaks = 0.0
    for n in (11, 17):
        c = 0.5 + 0.5 * np.cos(n * theta + 3 * smooth_noise(rng, x.shape, 8))
        c *= c
        c *= c
        streaks = streaks + c * c
    mottle = 0.25 * smooth_noise(rng, x.shape, 20)
    markings = np.zeros(g.x.shape, np.float32)
    markings[win] = (streaks + mottle) * np.exp(-r / 0.25) + 0.7 * np.exp(-(r / 0.05) ** 2)
    return markings


def _ribs(g: Grid, a: Anatomy, side: str) -> np.ndarray:
    """Posterior ribs as arcs sloping down laterally, slightly wider apart toward the bases."""
    u = SIDE_SIGN[side] * (g.x - a.midline) / a.half_width
    span = a.base(side) - a.apex
    v = np.clip((g.y - a.apex + 0.04 - 0.12 * u * u) / span, 0.0, None) ** 0.85
    bands = np.clip((np.cos(2 * np.pi * a.rib_count * v) - 0.3) * 3, 0.0, 1.0)
    u_abs = u * a.half_width
    extent = ramp((u_abs - 0.045) / g.edge) * ramp((lateral_edge(a, side, g.y) + 0.02 - u_abs) / g.edge)
    return bands * extent * ramp((diaphragm(a, side, u_abs) + 0.01 - g.y) / g.edge)


def _clavicle(g: Grid, a: Anatomy, side: str) -> np.ndarray:
    u = SIDE_SIGN[side] * (g.x - a.midline)
    centre = a.apex + 0.07 - 0.28 * (u - 0.04) + 0.5 * (u - 0.04) * (u - 0.3)
    return (ramp((0.017 - np.abs(g.y - centre)) / g.edge)
            * ramp((u - 0.035) / g.edge) * ramp((0.36 - u) / g.edge))


def _bones(g: Grid, a: Anatomy, mediastinum: np.ndarray) -> np.ndarray:
    """Additive bone density: ribs (faint behind the mediastinum), clavicles, spine with end plates, humeral heads."""
    dx = np.abs(g.x - a.midline)
    spine = ramp((0.036 - dx) / g.edge) * (0.8 + 0.2 * (np.cos(2 * np.pi * (g.y - a.apex) / 0.048) > 0.8))
    bone = 0.055 * spine
    for side in SIDES:
        s = SIDE_SIGN[side]
        bone += 0.075 * (1 - 0.7 * mediastinum) * _ribs(g, a, side) + 0.15 * _clavicle(g, a, side)
        bone += 0.18 * ellipse_mask(g, (a.midline + s * (a.half_width + 0.12), a.apex + 0.01), (0.07, 0.07))
    return bone


def _mediastinum(g: Grid, a: Anatomy) -> np.ndarray:
    """Heart, great vessels, aortic knob; the trachea is cut out as an air column."""
    hx, hy, ha, hb = a.heart
    heart = ellipse_mask(g, (hx, hy), (ha, hb), -a.heart_tilt)
    dx = g.x - a.midline
    half = 0.05 + 0.03 * np.clip((g.y - a.apex) / (hy - a.apex), 0.0, 1.0)  # widens toward the heart
    vessels = ramp((half - np.abs(dx + 0.01)) / g.edge) * ramp((hy - g.y) / g.edge)
    knob = ellipse_mask(g, (a.midline + 0.06, a.apex + 0.13), (0.045, 0.04))
    return np.maximum(heart, np.maximum(vessels, knob))


def _trachea(g: Grid, a: Anatomy) -> np.ndarray:
    return ramp((0.017 - np.abs(g.x - a.midline)) / g.edge) * ramp((a.carina - g.y) / g.edge)


def _gastric_bubble(g: Grid, a: Anatomy) -> np.ndarray:
    centre = (a.midline + 0.5 * a.half_width, a.dome["left"] + 0.045)
    return ellipse_mask(g, centre, (0.04, 0.025))


def draw_pneumothorax(img, g: Grid, a: Anatomy, f: Finding, rng, lung: np.ndarray) -> np.ndarray:
    """Lung collapsed toward the hilum and base: a black rim with no markings, edged by a bright pleural line."""
    shrink = (0.2, 0.32, 0.45)[SIZES.index(f.severity)] + rng.uniform(0.0, 0.05)
    hx, _ = a.hilum(f.side)
    foot = a.dome[f.side]
    x = hx + (g.x - hx) / (1 - shrink)
    y = foot + (g.y - foot) / (1 - 0.8 * shrink)
    line_edge = max(g.edge, 2.0 * g.pixel)
    collapsed = lung_mask(a, f.side, x, y, line_edge)
    img = over(img, lung * (1 - collapsed), 0.05)
    return img + 0.28 * lung * 4 * collapsed * (1 - collapsed)


def draw_consolidation(img, g: Grid, a: Anatomy, f: Finding, rng, lung: np.ndarray) -> np.ndarray:
    """Irregular dense patch confined to the lung, centred in the zone's third of the lung height."""
    depth = {"upper": 0.27, "middle": 0.53, "lower": 0.8}[f.zone] + rng.uniform(-0.03, 0.03)
    cy = a.apex + depth * (a.dome[f.side] - a.apex)
    out = lateral_edge(a, f.side, np.float32(cy))
    cx = a.midline + SIDE_SIGN[f.side] * (0.07 + rng.uniform(0.5, 0.65) * (out - 0.07))
    axes = (rng.uniform(0.075, 0.095), rng.uniform(0.065, 0.085))
    r = np.hypot((g.x - cx) / axes[0], (g.y - cy) / axes[1]) + 0.3 * smooth_noise(rng, g.x.shape, 12)
    return img + 0.34 * lung * ramp((1 - r) / 0.4)


def draw_effusion(img, g: Grid, a: Anatomy, f: Finding, rng, lung: np.ndarray) -> np.ndarray:
    """Dependent fluid: fills the base, rises along the lateral wall (meniscus), blunts the costophrenic angle."""
    frac = (0.22, 0.34, 0.48)[SIZES.index(f.severity)] + rng.uniform(0.0, 0.05)
    base = a.base(f.side)
    level = base - frac * (base - a.apex)
    u = SIDE_SIGN[f.side] * (g.x - a.midline)
    lateral = np.clip((u - 0.06) / (a.half_width - 0.06), 0.0, 1.0)
    surface = level - (0.05 + 0.1 * frac) * lateral ** 2
    soft = max(0.012, g.edge)
    fluid = (ramp((g.y - surface) / soft) * ramp((u - 0.045) / g.edge)
             * ramp((lateral_edge(a, f.side, g.y) + 0.01 - u) / g.edge) * ramp((base + 0.04 - g.y) / g.edge))
    depth = np.clip((g.y - surface) / 0.12, 0.0, 1.0)
    return over(img, fluid, FLUID + 0.06 * depth)


def _pacemaker_box(a: Anatomy, side: str) -> tuple[float, float]:
    """Centre of a pacemaker generator: below the clavicle, on its side's chest wall."""
    return a.midline + SIDE_SIGN[side] * 0.26, a.apex + 0.06


def _device_paths(a: Anatomy, f: Finding) -> list[tuple[list[tuple[float, float]], float]]:
    """(polyline, width) pieces of a device; all lines end in the superior vena cava or the heart."""
    m, top = a.midline, a.apex
    hx, hy, _, hb = a.heart
    svc = (m - 0.04, a.carina + 0.07)
    if f.kind == "endotracheal_tube":
        return [([(m + 0.003, -0.02), (m, a.carina - 0.045)], 0.03)]
    if f.kind == "central_line":
        if f.side == "right":  # internal jugular
            return [([(m - 0.13, -0.02), (m - 0.09, top + 0.04), (m - 0.05, top + 0.12), svc], 0.022)]
        return [([(m + 0.38, top + 0.05), (m + 0.2, top + 0.065), (m + 0.06, top + 0.1),
                  (m - 0.03, top + 0.15), svc], 0.022)]  # left subclavian
    s = SIDE_SIGN[f.side]
    box = _pacemaker_box(a, f.side)
    lead = [(box[0] - s * 0.03, box[1] + 0.01), (m + s * 0.1, top + 0.06), (m - 0.035, top + 0.15), svc]
    ventricle = lead + [(m - 0.02, hy - 0.01), (hx + 0.03, hy + 0.55 * hb)]
    atrium = lead + [(m - 0.045, hy - 0.04), (m - 0.02, hy - 0.08)]
    return [(ventricle, 0.018), (atrium, 0.018)]


def draw_device(img, g: Grid, a: Anatomy, f: Finding) -> np.ndarray:
    for points, width in _device_paths(a, f):
        img = over(img, polyline_mask(g, points, max(width, 1.5 * g.pixel)), METAL)
    if f.kind == "pacemaker":  # the generator can
        img = over(img, box_mask(g, _pacemaker_box(a, f.side), (0.055, 0.04)), 1.0)
    return img


LUNG_FINDINGS = {"pneumothorax": draw_pneumothorax, "consolidation": draw_consolidation,
                 "pleural_effusion": draw_effusion}  # drawing order matters: fluid covers, collapse removes


def _expose(rng: np.random.Generator, img: np.ndarray, a: Anatomy) -> np.ndarray:
    img = np.clip(img, 0.0, 1.0) ** a.gamma
    img = (img - 0.5) * a.contrast + 0.5 + a.brightness
    img = img + a.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def render(anatomy: Anatomy, findings: tuple[Finding, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) uint8 frontal radiograph of `anatomy` with `findings` drawn in."""
    a = anatomy
    g = make_grid(size, a.angle)
    img = _body(g, a)
    lungs = {side: lung_mask(a, side, g.x, g.y, g.edge) for side in SIDES}
    depth = np.clip((g.y - a.apex) / (a.dome["right"] - a.apex), 0.0, 1.0)  # soft tissue thickens downward
    img = over(img, lungs["right"] + lungs["left"], LUNG + 0.07 * depth + 0.08 * _lung_markings(rng, g, a))
    for kind, draw in LUNG_FINDINGS.items():
        for f in findings:
            if f.kind == kind:
                img = draw(img, g, a, f, rng, lungs[f.side])
    mediastinum = _mediastinum(g, a)
    img = over(img, 0.93 * mediastinum, HEART)
    img = img - 0.16 * _trachea(g, a)
    if a.gastric_bubble:
        img = img - 0.3 * _gastric_bubble(g, a)
    img = img + _bones(g, a, mediastinum)
    for f in findings:
        if f.kind in DEVICE_KINDS:
            img = draw_device(img, g, a, f)
    return _expose(rng, img, a)
