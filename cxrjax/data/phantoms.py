"""Synthetic frontal chest radiograph phantoms, written in the raw formats real datasets ship.

(Longer than ~400 lines on purpose: anatomy, findings and file writers are one generator whose
parts share the same per-patient parameters; it is demo data, not library code.)

The demo needs a dataset that runs offline, goes through the same path as real data (raw files ->
decode -> preprocess -> shards -> train) and has findings a model must actually learn. Each phantom
is drawn with vectorised numpy from a few anatomy parameters (body, lungs, ribs, spine, heart,
diaphragm, branching lung vessels); findings change the pixels the way they change a radiograph:

- cardiomegaly: heart shadow wider (cardiothoracic ratio > 0.5 instead of ~0.43);
- pleural effusion: basal homogeneous opacity with a meniscus that blunts the costophrenic angle;
- pneumothorax: apical/lateral rim of lung that is darker, has no vessels and ends at a thin
  visceral pleural line;
- no_finding: none of the three.

Geometry is defined in "anatomy units" (about one image height) and mapped to pixels through a
per-image pose, so body size, shift, rotation and image aspect vary without touching the shapes.

    python -m cxrjax.data.phantoms --out /tmp/phantoms --patients 300
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from scipy import ndimage

LABELS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "no_finding")
# Raw formats written, in equal shares: the mix real datasets hand to cxrjax readers.
FORMATS = ("dcm_mono2", "dcm_mono1", "dcm_j2k", "png16", "png8", "jpg")
_EXTENSIONS = {"png16": "png", "png8": "png", "jpg": "jpg"}
# Each finding's prevalence; independent draws give no_finding = 0.7**3 ~ 0.34.
PREVALENCE = 0.3
# Chance that a follow-up image re-draws its findings instead of keeping the previous image's.
_FOLLOW_UP_CHANGE = 0.2
_CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
_DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"
# Physical height of the detector, for PixelSpacing.
_DETECTOR_MM = 430.0


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Patient-level shape parameters, shared by all images of a patient (units: image height)."""

    scale: float  # body size relative to the image
    shift: tuple[float, float]  # (x, y) offset of the body centre
    rotation: float  # degrees, positive = clockwise on screen
    aspect: float  # image width / height
    lung_top: float  # apex height (y, anatomy units, 0 = image centre)
    lung_bottom: float  # costophrenic angle height
    lung_medial: float  # |x| of the medial lung border
    lung_lateral: float  # |x| of the lateral lung border (inner rib margin)
    dome: float  # diaphragm dome height as a fraction of lung height
    right_dome_lift: float  # the right dome sits higher (liver)
    ctr_normal: float  # cardiothoracic ratio without cardiomegaly
    ctr_enlarged: float  # cardiothoracic ratio with cardiomegaly
    heart_left_share: float  # fraction of the heart width left of the midline
    rib_start: float  # y of the first posterior rib at the spine
    rib_spacing: float
    tissue: float  # soft-tissue thickness (density scale)
    vessel_seed: int

    @property
    def thoracic_width(self) -> float:
        return 2.0 * self.lung_lateral


@dataclasses.dataclass(frozen=True)
class Findings:
    """What is wrong in one image. Severities are 0 where the finding is absent."""

    cardiomegaly: bool
    # Fluid height at the lateral chest wall as a fraction of lung height, (right, left) lung.
    effusion: tuple[float, float]
    # Fraction by which the lung has collapsed away from the chest wall, (right, left) lung.
    pneumothorax: tuple[float, float]

    def labels(self) -> dict[str, int]:
        cm = int(self.cardiomegaly)
        eff = int(max(self.effusion) > 0)
        ptx = int(max(self.pneumothorax) > 0)
        return {
            "cardiomegaly": cm,
            "pleural_effusion": eff,
            "pneumothorax": ptx,
            "no_finding": int(not (cm or eff or ptx)),
        }


NO_FINDINGS = Findings(cardiomegaly=False, effusion=(0.0, 0.0), pneumothorax=(0.0, 0.0))


@dataclasses.dataclass(frozen=True)
class Exposure:
    """Per-image acquisition: pose jitter of a follow-up, tone curve and noise."""

    shift: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0
    contrast: float = 1.0
    brightness: float = 0.0
    gamma: float = 1.0
    gradient: tuple[float, float] = (0.0, 0.0)  # heel effect / scatter, (x, y) slope
    noise: float = 0.0


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draws one patient's anatomy."""
    lung_lateral = rng.uniform(0.34, 0.40)
    return Anatomy(
        scale=rng.uniform(0.82, 1.0),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.05)),
        rotation=rng.uniform(-5.0, 5.0),
        aspect=float(rng.choice([1.0, 1.0, 0.82, 0.9, 1.12])),
        lung_top=rng.uniform(-0.40, -0.34),
        lung_bottom=rng.uniform(0.22, 0.30),
        lung_medial=rng.uniform(0.06, 0.08),
        lung_lateral=lung_lateral,
        dome=rng.uniform(0.14, 0.22),
        right_dome_lift=rng.uniform(0.01, 0.04),
        ctr_normal=float(np.clip(rng.normal(0.43, 0.025), 0.37, 0.48)),
        ctr_enlarged=rng.uniform(0.53, 0.64),
        heart_left_share=rng.uniform(0.6, 0.7),
        rib_start=rng.uniform(-0.40, -0.36),
        rib_spacing=rng.uniform(0.058, 0.068),
        tissue=rng.uniform(0.85, 1.15),
        vessel_seed=int(rng.integers(2**31)),
    )


def sample_findings(rng: np.random.Generator, prevalence: float = PREVALENCE) -> Findings:
    """Draws independent findings, each present with probability `prevalence`."""
    cardiomegaly = bool(rng.random() < prevalence)
    effusion = (0.0, 0.0)
    if rng.random() < prevalence:
        # One side (either) or both sides, with its own fluid height each.
        sides = [(True, False), (False, True), (True, True)][rng.choice(3, p=[0.35, 0.35, 0.3])]
        effusion = tuple(float(rng.uniform(0.25, 0.6)) if s else 0.0 for s in sides)
    pneumothorax = (0.0, 0.0)
    if rng.random() < prevalence:
        size = float(rng.uniform(0.24, 0.45))
        pneumothorax = (size, 0.0) if rng.random() < 0.5 else (0.0, size)
    return Findings(cardiomegaly, effusion, pneumothorax)


def sample_exposure(rng: np.random.Generator) -> Exposure:
    """Draws one image's acquisition settings."""
    return Exposure(
        shift=(rng.uniform(-0.015, 0.015), rng.uniform(-0.015, 0.015)),
        rotation=rng.uniform(-1.5, 1.5),
        contrast=rng.uniform(0.8, 1.2),
        brightness=rng.uniform(-0.06, 0.06),
        gamma=rng.uniform(0.8, 1.25),
        gradient=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),
        noise=rng.uniform(0.005, 0.025),
    )


def image_shape(anatomy: Anatomy, image_size: int) -> tuple[int, int]:
    """(rows, columns) of a patient's images: `image_size` rows, width from the aspect."""
    return image_size, max(8, int(round(image_size * anatomy.aspect)))


# ----------------------------------------------------------------------------------- geometry


class _Frame:
    """Anatomy coordinates of every pixel, and the pixel scale, for one pose."""

    def __init__(self, anatomy: Anatomy, exposure: Exposure, shape: tuple[int, int]) -> None:
        rows, cols = shape
        self.shape = shape
        self.scale = anatomy.scale
        self.theta = np.deg2rad(anatomy.rotation + exposure.rotation)
        self.offset = (
            anatomy.shift[0] + exposure.shift[0],
            anatomy.shift[1] + exposure.shift[1],
        )
        self.px = rows * anatomy.scale  # pixels per anatomy unit
        xi = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) / rows
        yi = (np.arange(rows, dtype=np.float32) + 0.5 - rows / 2) / rows
        dx = xi[None, :] - self.offset[0]
        dy = yi[:, None] - self.offset[1]
        c, s = np.float32(np.cos(self.theta)), np.float32(np.sin(self.theta))
        self.x = (c * dx + s * dy) / anatomy.scale
        self.y = (-s * dx + c * dy) / anatomy.scale

    def to_pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy coordinates -> (row, col) in pixels (continuous)."""
        rows, cols = self.shape
        c, s = np.cos(self.theta), np.sin(self.theta)
        xi = self.scale * (c * x - s * y) + self.offset[0]
        yi = self.scale * (s * x + c * y) + self.offset[1]
        return yi * rows + rows / 2 - 0.5, xi * rows + cols / 2 - 0.5

    def soft(self, signed_distance: np.ndarray, width_px: float = 0.8) -> np.ndarray:
        """Antialiased mask from a signed distance (anatomy units, positive inside)."""
        return np.clip(0.5 + signed_distance * (self.px / width_px), 0.0, 1.0)


def _lung_local(anatomy: Anatomy, x: np.ndarray, y: np.ndarray, side: int):
    """Lung-local coordinates: X = 0 medial .. 1 lateral, Y = 0 apex .. 1 costophrenic angle."""
    lift = anatomy.right_dome_lift if side == 0 else 0.0
    bottom = anatomy.lung_bottom - lift
    width = anatomy.lung_lateral - anatomy.lung_medial
    height = bottom - anatomy.lung_top
    sign = -1.0 if side == 0 else 1.0  # right lung on the image's left
    lx = (sign * x - anatomy.lung_medial) / width
    ly = (y - anatomy.lung_top) / height
    return lx, ly, width, height


def _lung_margin(anatomy: Anatomy, lx: np.ndarray, ly: np.ndarray, width: float, height: float):
    """Approximate signed distance to the lung outline (anatomy units, positive inside)."""
    yc = np.clip(ly, 0.0, 1.0)
    # Lateral wall bulges out from the apex and is vertical in the lower quarter; the medial
    # border closes on the apex in the upper quarter.
    lateral = 0.35 + 0.65 * np.sqrt(1.0 - (1.0 - np.minimum(yc / 0.75, 1.0)) ** 2)
    medial = 0.35 - 0.35 * np.sqrt(1.0 - (1.0 - np.minimum(yc / 0.25, 1.0)) ** 2)
    # Diaphragm dome: highest at X = 0.4, down to the costophrenic angle at X = 1 and to the
    # cardiophrenic angle medially.
    k = np.where(lx > 0.4, (lx - 0.4) / 0.6, (lx - 0.4) / 0.8)
    floor = 1.0 - anatomy.dome * (1.0 - np.minimum(k**2, 1.0))
    return np.minimum.reduce(
        [
            (lx - medial) * width,
            (lateral - lx) * width,
            ly * height,
            (floor - ly) * height,
        ]
    )


def _heart_margin(anatomy: Anatomy, findings: Findings, x: np.ndarray, y: np.ndarray):
    """Signed distance-like margin of the heart: two half-ellipses meeting at the midline, their
    lower quarter hidden below the diaphragm (cut at the cardiophrenic angles)."""
    ctr = anatomy.ctr_enlarged if findings.cardiomegaly else anatomy.ctr_normal
    width = ctr * anatomy.thoracic_width
    left = width * anatomy.heart_left_share
    right = width - left
    half_height = 0.42 * width
    floor = anatomy.lung_top + (1.0 - 0.75 * anatomy.dome) * (
        anatomy.lung_bottom - anatomy.lung_top
    )
    cy = floor - 0.75 * half_height
    semi_x = np.where(x > 0, left, right)
    r = np.sqrt((x / semi_x) ** 2 + ((y - cy) / half_height) ** 2)
    return np.minimum((1.0 - r) * np.minimum(semi_x, half_height), floor - y)


def phantom_regions(
    anatomy: Anatomy,
    findings: Findings,
    shape: tuple[int, int],
    exposure: Exposure = Exposure(),
) -> dict[str, np.ndarray]:
    """Soft masks (float32 in [0, 1], `shape`) of the regions a finding changes.

    Keys: `lung_right`, `lung_left` (whole lung fields), `heart`, `effusion` (fluid),
    `pneumothorax` (air rim without lung), `pleural_line`, `collapsed_lung` (what is left of
    a lung with a pneumothorax), `body`.
    """
    f = _Frame(anatomy, exposure, shape)
    return _regions(anatomy, findings, f)


def _regions(anatomy: Anatomy, findings: Findings, f: _Frame) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    effusion = np.zeros(f.shape, np.float32)
    ptx = np.zeros(f.shape, np.float32)
    line = np.zeros(f.shape, np.float32)
    shrunk = np.zeros(f.shape, np.float32)
    for side, name in ((0, "lung_right"), (1, "lung_left")):
        lx, ly, w, h = _lung_local(anatomy, f.x, f.y, side)
        lung = f.soft(_lung_margin(anatomy, lx, ly, w, h))
        out[name] = lung
        level = findings.effusion[side]
        if level > 0:
            # Meniscus: the fluid climbs the lateral chest wall, so the costophrenic angle goes
            # first; its upper edge fades over a few pixels like a real layering effusion.
            top = 1.0 - level * (0.6 + 0.4 * np.clip(lx, 0.0, 1.0) ** 2)
            effusion = np.maximum(effusion, lung * f.soft((ly - top) * h, width_px=2.5))
        size = findings.pneumothorax[side]
        if size > 0:
            # The lung shrinks towards its lower medial corner: the air rim is widest at the
            # apex and the lateral wall and vanishes at the base.
            c = 1.0 - size
            x0, y0 = 0.1, 0.9
            cx, cy = x0 + (lx - x0) / c, y0 + (ly - y0) / c
            collapsed_margin = _lung_margin(anatomy, cx, cy, w, h) * c
            collapsed = f.soft(collapsed_margin)
            ptx = np.maximum(ptx, lung * (1.0 - collapsed))
            shrunk = np.maximum(shrunk, lung * collapsed)
            dist_px = collapsed_margin * f.px
            line = np.maximum(line, lung * np.exp(-((dist_px / 0.7) ** 2)))
    out["heart"] = f.soft(_heart_margin(anatomy, findings, f.x, f.y))
    out["effusion"] = effusion
    out["pneumothorax"] = ptx
    out["pleural_line"] = line
    out["collapsed_lung"] = shrunk
    out["body"] = _body(anatomy, f)
    return out


def _body(anatomy: Anatomy, f: _Frame) -> np.ndarray:
    """Torso outline: neck, shoulders, chest wall."""
    y = f.y
    shoulder = 1.0 / (1.0 + np.exp(-(y + 0.41) / 0.02))
    half = 0.09 + (anatomy.lung_lateral + 0.10 - 0.09) * shoulder - 0.03 * np.clip(y - 0.3, 0, None)
    return f.soft(half - np.abs(f.x), width_px=1.5)


# ----------------------------------------------------------------------------------- drawing


def _bump(t: np.ndarray) -> np.ndarray:
    """Compact stand-in for exp(-t**2) (same half width), several times cheaper to evaluate."""
    return np.square(np.clip(1.0 - t * t / 2.25, 0.0, None))


def _ribs(anatomy: Anatomy, f: _Frame) -> np.ndarray:
    """Posterior ribs (bright bands sweeping down-laterally), fainter anterior ribs, clavicles."""
    ax = np.abs(f.x)
    n_ribs = 10
    # All ribs share one curve shifted by the rib spacing, so the nearest rib of each pixel
    # follows from its phase: no per-rib image stack. Posterior ribs leave the spine nearly
    # horizontal and bend down at the chest wall.
    phase = (f.y - anatomy.rib_start + 0.04 * ax - 0.85 * ax**2) / anatomy.rib_spacing
    k = np.clip(np.round(phase), 0, n_ribs - 1)
    offset = (phase - k) * anatomy.rib_spacing
    thick = 0.016 + 0.002 * k / (n_ribs - 1)
    posterior = _bump(offset / thick)
    # Cortical rims are denser than the marrow.
    posterior *= 0.7 + 0.3 * (np.abs(offset) > 0.5 * thick)
    lateral = anatomy.lung_lateral + 0.025
    phase = (f.y - anatomy.rib_start - 0.13 + 0.55 * (lateral - 0.005 - ax)) / anatomy.rib_spacing
    k = np.clip(np.round(phase), 0, n_ribs - 1)
    offset = (phase - k) * anatomy.rib_spacing
    anterior = 0.45 * _bump(offset / 0.013) * (ax > 0.08)
    ribs = np.maximum(posterior, anterior)
    ribs *= f.soft(lateral - ax, 2.0) * f.soft(ax - 0.03, 1.0)
    clavicle_centre = anatomy.lung_top + 0.02 - 0.18 * (ax - 0.05)
    clavicle = _bump((f.y - clavicle_centre) / 0.014)
    clavicle *= f.soft((ax - 0.05) * (lateral + 0.03 - ax), 1.0)
    return np.maximum(ribs, 1.2 * clavicle)


def _spine(anatomy: Anatomy, f: _Frame) -> np.ndarray:
    """Vertebral column with darker disc spaces, and the air of the trachea."""
    width = 0.034
    column = f.soft(width - np.abs(f.x), 1.0)
    wave = np.cos((2 * np.pi / anatomy.rib_spacing) * (f.y - anatomy.rib_start))
    # Squaring three times (cos**8) keeps only the crests: narrow disc spaces between bodies.
    crest = np.square(np.square(np.square(wave)))
    discs = 0.75 + 0.25 * crest
    pedicles = _bump((np.abs(f.x) - 0.024) / 0.005) * (wave > 0.3)
    trachea = f.soft(0.014 - np.abs(f.x - 0.004), 1.0) * f.soft(-0.17 - f.y, 2.0)
    return column * (discs + 0.3 * pedicles) - 0.5 * trachea


@functools.lru_cache(maxsize=16)
def _vessel_tree(seed: int, lung_medial: float, lung_top: float) -> np.ndarray:
    """Segments (x0, y0, x1, y1, width) of both lungs' vascular trees, in anatomy units.

    Built one generation at a time: every branch splits in two, turning 15-35 degrees each
    way, shorter and thinner than its parent. Cached: follow-ups of a patient share the tree.
    """
    rng = np.random.default_rng(seed)
    # Trunks fan out from each hilum upwards, laterally and (most) downwards to the bases.
    fan = np.deg2rad(np.array([-125, -70, -25, 15, 50, 80, 100], float))
    angles = np.concatenate([fan, fan]) + np.deg2rad(rng.uniform(-12, 12, 2 * len(fan)))
    side = np.repeat([-1.0, 1.0], len(fan))
    start = np.stack([side * (lung_medial + 0.06), np.full_like(side, lung_top + 0.36)], axis=1)
    direction = np.stack([side * np.cos(angles), np.sin(angles)], axis=1)
    length = np.full(len(side), 0.085)
    width = 0.009
    levels = []
    for depth in range(6):
        end = start + direction * length[:, None]
        levels.append(np.concatenate([start, end, np.full((len(start), 1), width)], axis=1))
        if depth == 5:
            break
        turn = np.deg2rad(rng.uniform(15, 35, (len(start), 2))) * np.array([-1.0, 1.0])
        turn = turn.reshape(-1)
        parent = np.repeat(direction, 2, axis=0)
        c, s = np.cos(turn), np.sin(turn)
        direction = np.stack(
            [parent[:, 0] * c - parent[:, 1] * s, parent[:, 0] * s + parent[:, 1] * c], axis=1
        )
        start = np.repeat(end, 2, axis=0)
        length = np.repeat(length, 2) * rng.uniform(0.65, 0.85, 2 * len(length))
        width *= 0.72
    return np.concatenate(levels)


def _vessels(anatomy: Anatomy, f: _Frame) -> np.ndarray:
    """Branching vascular tree from each hilum, thinning and fading towards the periphery."""
    seg = _vessel_tree(anatomy.vessel_seed, anatomy.lung_medial, anatomy.lung_top)
    r0, c0 = f.to_pixels(seg[:, 0], seg[:, 1])
    r1, c1 = f.to_pixels(seg[:, 2], seg[:, 3])
    n = np.maximum(2, np.ceil(np.hypot(r1 - r0, c1 - c0) / 0.5)).astype(int)
    idx = np.repeat(np.arange(len(seg)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n - 1, n)
    rows = r0[idx] + t * (r1 - r0)[idx]
    cols = c0[idx] + t * (c1 - c0)[idx]
    width_px = seg[idx, 4] * f.px
    out = np.zeros(f.shape, np.float32)
    # Splat by width class, then blur each class with its own sigma: thick trunks are soft,
    # peripheral branches fine. Density per sample scales with calibre, floored so that the
    # sub-pixel peripheral branches still leave faint markings out to the chest wall.
    for lo, hi in ((0.0, 1.0), (1.0, 2.0), (2.0, np.inf)):
        sel = (width_px >= lo) & (width_px < hi)
        if not sel.any():
            continue
        layer = _splat(f.shape, rows[sel], cols[sel], np.maximum(width_px[sel], 0.8))
        sigma = max(0.6, float(np.median(width_px[sel])) / 2)
        out += ndimage.gaussian_filter(layer, sigma, mode="constant")
    return out


def _splat(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray, w: np.ndarray):
    """Bilinear accumulation of weighted points into an image."""
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    flat, weights = [], []
    for dr, dc, wt in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        flat.append(rr[ok] * shape[1] + cc[ok])
        weights.append((wt * w)[ok] * 0.5)
    counts = np.bincount(np.concatenate(flat), np.concatenate(weights), shape[0] * shape[1])
    return counts.reshape(shape).astype(np.float32)


def render_density(
    anatomy: Anatomy,
    findings: Findings,
    shape: tuple[int, int],
    exposure: Exposure = Exposure(),
) -> np.ndarray:
    """Noise-free projected density (float32, higher = more attenuating) before the tone curve."""
    f = _Frame(anatomy, exposure, shape)
    reg = _regions(anatomy, findings, f)
    body = reg["body"]
    lungs = np.maximum(reg["lung_right"], reg["lung_left"])
    heart = reg["heart"]
    # Projected soft tissue is thickest at the midline (a cylinder seen side-on).
    half = anatomy.lung_lateral + 0.1
    thickness = np.sqrt(np.clip(1 - (f.x / half) ** 2, 0.0, 1.0))
    density = body * anatomy.tissue * (0.42 + 0.18 * thickness)
    aerated = lungs * (1.0 - heart)
    density -= 0.33 * aerated * (1.0 - reg["effusion"])
    density += 0.05 * heart * body
    # Vessels are lung tissue: gone where fluid replaces air or where the lung has fallen away.
    vessel_gain = aerated * (1.0 - reg["effusion"]) * (1.0 - reg["pneumothorax"])
    density += 0.09 * np.minimum(_vessels(anatomy, f), 1.5) * vessel_gain
    # The rim holds only air; the lung it left behind holds the same tissue in less volume.
    density -= 0.14 * reg["pneumothorax"] * (1.0 - reg["effusion"])
    density += 0.05 * reg["collapsed_lung"] * (1.0 - heart) * (1.0 - reg["effusion"])
    density += 0.10 * reg["pleural_line"] * (1.0 - reg["effusion"])
    density += body * (0.10 * _ribs(anatomy, f) + 0.20 * _spine(anatomy, f))
    # Gastric bubble under the left dome.
    bubble_y = anatomy.lung_bottom + 0.03
    bubble = f.soft(0.035 - np.hypot((f.x - 0.2) / 1.6, f.y - bubble_y), 1.5)
    density -= 0.12 * bubble * body
    return density.astype(np.float32)


def render_phantom(
    anatomy: Anatomy,
    findings: Findings,
    exposure: Exposure,
    shape: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """One radiograph, float32 in [0, 1], bright = attenuating (MONOCHROME2 convention)."""
    density = render_density(anatomy, findings, shape, exposure)
    rows, cols = shape
    yy = (np.arange(rows, dtype=np.float32) / rows - 0.5)[:, None]
    xx = (np.arange(cols, dtype=np.float32) / cols - 0.5)[None, :]
    img = np.clip(exposure.contrast * density + 0.08 + exposure.brightness, 0.0, 1.0)
    img = img**exposure.gamma + exposure.gradient[0] * xx + exposure.gradient[1] * yy
    # Quantum noise grows with signal; a little is present even in the direct-exposure area.
    sigma = exposure.noise * (0.4 + np.sqrt(np.clip(img, 0.0, 1.0)))
    img = img + sigma * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------- writing


def _quantise(img: np.ndarray, bits: int) -> np.ndarray:
    return np.round(img * (2**bits - 1)).astype(np.uint16)


def _write_dicom(
    path: Path,
    img: np.ndarray,
    patient_id: str,
    uid_key: str,
    rng: np.random.Generator,
    monochrome1: bool,
    j2k: bool,
) -> None:
    bits = int(rng.integers(12, 17))
    stored = _quantise(img, bits)
    if monochrome1:
        stored = (2**bits - 1) - stored
    meta = FileMetaDataset()
    sop_class = _CR_SOP_CLASS if rng.random() < 0.5 else _DX_SOP_CLASS
    sop_uid = generate_uid(entropy_srcs=[uid_key, "sop"])
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["cxrjax-phantoms"])
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_key, "series"])
    ds.Modality = "CR" if sop_class == _CR_SOP_CLASS else "DX"
    ds.PatientID = patient_id
    ds.PatientName = patient_id.replace("-", "^")
    ds.StudyDate = f"2024{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = img.shape
    spacing = f"{_DETECTOR_MM / img.shape[0]:.4f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rng.random() < 0.5:
        # Some vendors store a modality LUT; readers must apply it before any inversion.
        ds.RescaleSlope = str(rng.choice([0.5, 1.0, 2.0]))
        ds.RescaleIntercept = str(rng.choice([-1024, 0, 100]))
        ds.RescaleType = "US"
    ds.PixelData = stored.tobytes()
    if j2k:
        ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)


def save_radiograph(
    stem: str | Path,
    img: np.ndarray,
    fmt: str,
    rng: np.random.Generator,
    patient_id: str = "PHANTOM-00000",
    uid_key: str = "",
) -> Path:
    """Writes a [0, 1] image (bright = attenuating) as `stem.<ext>` in format `fmt`; returns path.

    `fmt` is one of FORMATS. `rng` draws what varies between files of one format (bits stored,
    rescale, photometric interpretation of JPEG 2000 files, SOP class); `uid_key` seeds the DICOM
    UIDs so that the same key gives the same file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown phantom format {fmt!r}; use one of {FORMATS}")
    path = Path(stem).with_suffix("." + _EXTENSIONS.get(fmt, "dcm"))
    if fmt.startswith("dcm"):
        mono1 = fmt == "dcm_mono1" or (fmt == "dcm_j2k" and rng.random() < 0.5)
        key = uid_key or path.as_posix()
        _write_dicom(path, img, patient_id, key, rng, monochrome1=mono1, j2k=fmt == "dcm_j2k")
    elif fmt == "png16":
        # PadChest-style: 16-bit container holding fewer significant bits.
        Image.fromarray(_quantise(img, int(rng.integers(12, 17)))).save(path)
    elif fmt == "png8":
        Image.fromarray(_quantise(img, 8).astype(np.uint8)).save(path)
    else:
        Image.fromarray(_quantise(img, 8).astype(np.uint8)).save(path, quality=92)
    return path


def patient_id(index: int) -> str:
    """Synthetic patient identifier of the index-th phantom patient."""
    return f"PHANTOM-{index:05d}"


def _write_patient(job: tuple) -> list[dict]:
    """Renders and writes all images of one patient; its own seed makes it order-independent."""
    out_dir, index, formats, image_size, seed = job
    rng = np.random.default_rng([seed, index])
    anatomy = sample_anatomy(rng)
    shape = image_shape(anatomy, image_size)
    pid = patient_id(index)
    folder = out_dir / "images" / pid
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    findings = sample_findings(rng)
    for n, fmt in enumerate(formats):
        if n > 0 and rng.random() < _FOLLOW_UP_CHANGE:
            findings = sample_findings(rng)
        img = render_phantom(anatomy, findings, sample_exposure(rng), shape, rng)
        path = save_radiograph(folder / str(n), img, fmt, rng, pid, f"{seed}-{index}-{n}")
        rows.append({"path": path.relative_to(out_dir).as_posix(), "patient_id": pid})
        rows[-1].update(findings.labels())
    return rows


def write_phantom_dataset(
    out_dir: str | Path,
    n_patients: int = 300,
    images_per_patient: tuple[int, int] = (1, 3),
    image_size: int = 256,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Writes `n_patients` synthetic patients' radiographs and a `labels.csv`; returns its path.

    Images go to `out_dir/images/PHANTOM-NNNNN/<n>.<dcm|png|jpg>`, formats mixed in equal
    shares (see FORMATS). `labels.csv` has `path` (relative to `out_dir`), `patient_id` and one
    0/1 column per name in LABELS. The same arguments give the same pixels. `workers` > 1
    renders patients in parallel processes (default: up to 4, one per CPU).
    """
    lo, hi = images_per_patient
    # JPEG 2000's default 6 resolution levels need both sides >= 32 px (aspect down to 0.82).
    if n_patients < 1 or not 1 <= lo <= hi or image_size < 40:
        raise ValueError(
            f"write_phantom_dataset: need n_patients >= 1, 1 <= images_per_patient[0] <= [1] and "
            f"image_size >= 40; got {n_patients}, {images_per_patient}, {image_size}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = np.random.default_rng([seed, 2**31])
    counts = plan.integers(lo, hi + 1, size=n_patients)
    # Exactly equal format shares, randomly spread over images.
    formats = plan.permutation(np.resize(np.arange(len(FORMATS)), counts.sum()))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    jobs = [
        (out_dir, i, [FORMATS[k] for k in formats[bounds[i] : bounds[i + 1]]], image_size, seed)
        for i in range(n_patients)
    ]
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers > 1 and n_patients > 1:
        # Spawned, not forked: callers such as cxrjax.main have JAX's threads running.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_write_patient, jobs, chunksize=max(1, len(jobs) // 32)))
    else:
        results = [_write_patient(job) for job in jobs]
    frame = pd.DataFrame([row for rows in results for row in rows])
    csv_path = out_dir / "labels.csv"
    frame[["path", "patient_id", *LABELS]].to_csv(csv_path, index=False)
    return csv_path


def main(argv: Sequence[str] | None = None) -> None:
    # argparse, not absl flags: importing this module must not register global flags that
    # could collide with cxrjax.main's.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--min_images", type=int, default=1)
    parser.add_argument("--max_images", type=int, default=3)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    csv_path = write_phantom_dataset(
        args.out,
        n_patients=args.patients,
        images_per_patient=(args.min_images, args.max_images),
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
    )
    frame = pd.read_csv(csv_path)
    prevalence = ", ".join(f"{name} {frame[name].mean():.2f}" for name in LABELS)
    print(
        f"wrote {len(frame)} images of {args.patients} patients to {csv_path} "
        f"in {time.perf_counter() - start:.1f} s; prevalence: {prevalence}"
    )


if __name__ == "__main__":
    main()
