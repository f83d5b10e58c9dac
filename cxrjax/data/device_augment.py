"""Augmentation parameters shared by the host and the device paths, and the device path itself.

Both paths turn the same `NUM_UNIFORMS` uniform variates per image into the same inverse affine
map and intensity curve (`geometry`, `intensity_curve`, written once for numpy and jax.numpy), so
the two give the same distribution by construction; they differ only in where the variates come
from (a hash of seed, epoch and record on the host, `pipeline.example_uniforms`; `jax.random` on
the device) and in rounding (the host keeps uint8).

On the device, inside the jitted train step, with the loader built with `Augment(0.0, 0.0)`:

    images = device_augment(batch["image"], jax.random.fold_in(step_rng, 1), augment)
    images = normalize(images, mean, std)  # float32 in [0, 255], like the uint8 it replaces

Resampling is bilinear with zeros outside the image, on pixel centres at integer coordinates:
`cv2.warpAffine(..., INTER_LINEAR | WARP_INVERSE_MAP, BORDER_CONSTANT)` on the host and
`jax.scipy.ndimage.map_coordinates(order=1, mode="constant")` on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

# Columns of the uniform variates: flip, angle, crop (area, log-ratio, x, y), affine (tx, ty,
# scale, shear), brightness, contrast, gamma. Every augmentation draws its column whether it is
# on or not, so switching one on never changes the draws of another.
NUM_UNIFORMS = 13


@dataclasses.dataclass(frozen=True)
class Augment:
    """The study's augmentation by default: horizontal flip p=0.5 and rotation within +-7 deg.

    The rest are off by default. crop_area: random resized crop with the box's area fraction
    uniform in this range (log aspect ratio uniform in crop_ratio; a side longer than the image is
    clipped to it rather than redrawn as torchvision does). translate (fraction of the side),
    scale (relative), shear (degrees): uniform in +-value. brightness (added, [0, 1] units) and
    contrast (factor about mid-grey): uniform in +-value; gamma: exponent log-uniform in
    [1 / (1 + gamma), 1 + gamma].
    """

    flip_prob: float = 0.5
    max_rotation: float = 7.0
    crop_area: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0

    def __post_init__(self):
        # Tuples keep the dataclass hashable (a static argument of jit) when configs give lists.
        object.__setattr__(self, "crop_area", tuple(self.crop_area))
        object.__setattr__(self, "crop_ratio", tuple(self.crop_ratio))

    @property
    def warps(self) -> bool:
        """Whether any resampling augmentation (beyond a flip) is on."""
        return bool(
            self.max_rotation
            or self.crop_area != (1.0, 1.0)
            or self.translate
            or self.scale
            or self.shear
        )

    @property
    def changes_intensity(self) -> bool:
        return bool(self.brightness or self.contrast or self.gamma)

    @property
    def active(self) -> bool:
        return bool(self.flip_prob or self.warps or self.changes_intensity)


def geometry(u: Any, augment: Augment, height: int, width: int, xp: Any = jnp) -> Any:
    """Inverse affine maps (..., 2, 3): output pixel (x, y, 1) -> input pixel, centres at integers.

    Forward order: crop-and-resize, flip, rotate about the centre, then scale/shear/translate.
    """
    cx, cy = (width - 1) / 2, (height - 1) / 2
    flip = xp.where(u[..., 0] < augment.flip_prob, -1.0, 1.0)
    theta = (2 * u[..., 1] - 1) * math.radians(augment.max_rotation)
    lo, hi = augment.crop_area
    area = lo + (hi - lo) * u[..., 2]
    log_lo, log_hi = (math.log(r) for r in augment.crop_ratio)
    if augment.crop_area == (1.0, 1.0):
        log_lo = log_hi = 0.0  # no crop: the aspect ratio must not squeeze the whole image
    log_ratio = log_lo + u[..., 3] * (log_hi - log_lo)
    crop_w = xp.minimum(1.0, xp.sqrt(area * xp.exp(log_ratio)))
    crop_h = xp.minimum(1.0, xp.sqrt(area / xp.exp(log_ratio)))
    # Crop box centre in input pixels (the box's left edge is uniform over the free width).
    centre_x = u[..., 4] * (1 - crop_w) * width + crop_w * width / 2 - 0.5
    centre_y = u[..., 5] * (1 - crop_h) * height + crop_h * height / 2 - 0.5
    tx = (2 * u[..., 6] - 1) * augment.translate * width
    ty = (2 * u[..., 7] - 1) * augment.translate * height
    zoom = 1 + (2 * u[..., 8] - 1) * augment.scale
    shear = xp.tan((2 * u[..., 9] - 1) * math.radians(augment.shear))
    cos, sin = xp.cos(theta), xp.sin(theta)
    # K = crop scaling @ flip @ R(-theta) @ (zoom * shear)^-1, written out entry by entry.
    r00, r01, r10, r11 = cos, sin, -sin, cos
    a00, a01, a11 = 1 / zoom, -shear / zoom, 1 / zoom
    k00 = crop_w * flip * r00 * a00
    k01 = crop_w * flip * (r00 * a01 + r01 * a11)
    k10 = crop_h * r10 * a00
    k11 = crop_h * (r10 * a01 + r11 * a11)
    ox, oy = cx + tx, cy + ty
    rows = [
        xp.stack([k00, k01, centre_x - k00 * ox - k01 * oy], axis=-1),
        xp.stack([k10, k11, centre_y - k10 * ox - k11 * oy], axis=-1),
    ]
    return xp.stack(rows, axis=-2)


def intensity_curve(x: Any, u: Any, augment: Augment, xp: Any = jnp) -> Any:
    """Gamma, then contrast about mid-grey, then brightness, on values in [0, 1]; clipped."""
    log_gamma = (2 * u[..., 12] - 1) * math.log1p(augment.gamma)
    contrast = 1 + (2 * u[..., 11] - 1) * augment.contrast
    brightness = (2 * u[..., 10] - 1) * augment.brightness
    y = xp.power(x, xp.exp(log_gamma))
    return xp.clip((y - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    height, width = image.shape
    y, x = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    src_x = matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2]
    src_y = matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2]
    return ndimage.map_coordinates(image, [src_y, src_x], order=1, mode="constant", cval=0.0)


def device_augment(images: jax.Array, rng: jax.Array, augment: Augment) -> jax.Array:
    """uint8 (B, H, W) -> float32 (B, H, W) in [0, 255], augmented per image; jit-compatible.

    `augment` is static (hashable): under `jax.jit`, close over it or mark it static. Each image's
    draws are row `i` of `jax.random.uniform(rng, (B, NUM_UNIFORMS))`.
    """
    if not augment.active:
        return images.astype(jnp.float32)
    u = jax.random.uniform(rng, (images.shape[0], NUM_UNIFORMS), jnp.float32)
    return apply(images, u, augment)


def apply(images: jax.Array, u: jax.Array, augment: Augment) -> jax.Array:
    """`device_augment` with given draws `u` (B, NUM_UNIFORMS): the host path's twin."""
    x = images.astype(jnp.float32)
    _, height, width = images.shape
    if augment.warps:
        matrices = geometry(u, augment, height, width, jnp).astype(jnp.float32)
        x = jax.vmap(_warp)(x, matrices)
    elif augment.flip_prob:
        # A pure flip needs no resampling: exact, and cheaper than a gather.
        x = jnp.where((u[:, 0] < augment.flip_prob)[:, None, None], x[:, :, ::-1], x)
    if augment.changes_intensity:
        x = 255.0 * intensity_curve(x / 255.0, u[:, None, None, :], augment, jnp)
    return x
