"""Prepared shards -> multi-crop batches for self-supervised training (labels ignored).

Every example yields 2 global crops and `num_local` local crops with the radiograph
augmentations: random resized crop (DINOv2's scales and aspect ratios, antialiased when it
shrinks), horizontal flip, a small
rotation, brightness/contrast and Gaussian blur (DINOv2's per-crop probabilities: 1.0 and 0.1
for the global crops, 0.5 for local ones). No colour jitter, grayscale or solarisation: the
images are grayscale radiographs. Each global crop also gets an iBOT block mask over its patch
grid (with `mask_prob`, a ratio uniform in `mask_ratio`).

Determinism follows `cxrjax.data.pipeline`: epoch e is one seeded permutation of the pooled
training examples of all sources, process p of N takes rows [p B/N, (p+1) B/N) of each global
batch, and an example's crops and masks are drawn from (seed, epoch, record) alone, so a batch is
the same whatever the process, thread and worker counts. The loader is a `pipeline.TrainLoader`:
its iterator state is the next global step, which resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import cv2
import grain
import numpy as np

from cxrjax.data import pipeline, shards
from cxrjax.errors import ConfigError

# Separates the multi-crop streams from any other use of the same seed.
_DOMAIN = 0x55534C  # "SSL"


@dataclasses.dataclass(frozen=True)
class CropOptions:
    global_size: int = 224
    local_size: int = 96
    num_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip_prob: float = 0.5
    max_rotation: float = 10.0  # degrees
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    # Gaussian blur probability for global crop 1, global crop 2 and each local crop.
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # at 224 px; scaled with the crop size
    patch_size: int = 16
    mask_prob: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)

    @property
    def grid(self) -> int:
        return self.global_size // self.patch_size

    @property
    def max_masked(self) -> int:
        """The most patches one global crop's mask holds."""
        return max(int(self.mask_ratio[1] * self.grid**2), 1)

    def masked_slots(self, global_crops: int) -> int:
        """The masked patches the step gathers over `global_crops` crops: DINOv2's bound
        (`upperbound` in its collate), the masked crops' share of crops times `max_masked`.

        A crop's mask averages mean(mask_ratio) / max(mask_ratio) of `max_masked`, so the
        bound holds about 1.7x the expected count at the default ratios (and 1 / (mask_prob x
        that) less than a slot per patch of every crop); the rare batch with more drops
        the excess (the step's `ibot_overflow` metric counts them).
        """
        return max(math.ceil(global_crops * self.mask_prob * self.max_masked), 1)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    options: CropOptions,
    blur_prob: float,
) -> np.ndarray:
    """One augmented (size, size) uint8 crop of a uint8 (H, W) image."""
    height, width = image.shape
    area = height * width * rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = min(math.sqrt(area * ratio), width)
    h = min(math.sqrt(area / ratio), height)
    cx = rng.uniform(w / 2, width - w / 2)
    cy = rng.uniform(h / 2, height - h / 2)
    angle = math.radians(rng.uniform(-options.max_rotation, options.max_rotation))
    flip = -1.0 if rng.random() < options.flip_prob else 1.0
    # Antialiasing: a crop that shrinks its region is first area-averaged (cv2.INTER_AREA, as
    # cxrjax.data.images shrinks) to about the output's scale, so the bilinear warp below never
    # skips source pixels (which aliases the ribs' and vessels' fine lines).
    kx, ky = max(w / size, 1.0), max(h / size, 1.0)
    if kx > 1 or ky > 1:
        new_w, new_h = max(round(width / kx), 1), max(round(height / ky), 1)
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        fx, fy = new_w / width, new_h / height
        w, h, cx, cy = w * fx, h * fy, cx * fx, cy * fy
    cos, sin = math.cos(angle), math.sin(angle)
    sx, sy = flip * w / size, h / size
    # Output pixel (u, v) -> source (x, y): centre, scale (and flip), rotate, move to the crop.
    matrix = np.array([[cos * sx, -sin * sy, 0.0], [sin * sx, cos * sy, 0.0]])
    half = (size - 1) / 2
    matrix[:, 2] = [cx - 0.5, cy - 0.5] - matrix[:, :2] @ [half, half]
    crop = cv2.warpAffine(
        image,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    jitter, b, c = rng.random(), rng.uniform(-1, 1), rng.uniform(-1, 1)
    blur, sigma = rng.random(), rng.uniform(*options.blur_sigma)
    out = crop.astype(np.float32)
    if jitter < options.jitter_prob:
        out *= 1 + options.brightness * b
        mean = out.mean()
        out = (out - mean) * (1 + options.contrast * c) + mean
    if blur < blur_prob:
        out = cv2.GaussianBlur(out, (0, 0), sigma * size / 224)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def block_mask(rng: np.random.Generator, grid: int, target: int) -> np.ndarray:
    """(grid * grid,) bool with at most `target` patches set, in rectangular blocks (iBOT's
    blockwise masking: blocks of >= 4 patches, aspect ratio in [0.3, 1/0.3])."""
    mask = np.zeros((grid, grid), bool)
    count, tries = 0, 0
    while count < target and tries < 50:
        tries += 1
        remaining = target - count
        block_area = rng.uniform(min(4, remaining), remaining)
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = int(np.clip(round(math.sqrt(block_area * aspect)), 1, grid))
        w = int(np.clip(round(math.sqrt(block_area / aspect)), 1, grid))
        top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        new = int((~mask[top : top + h, left : left + w]).sum())
        if 0 < new <= remaining:
            mask[top : top + h, left : left + w] = True
            count += new
    return mask.reshape(-1)


def example_crops(image: np.ndarray, rng: np.random.Generator, options: CropOptions) -> dict:
    """The crops and masks of one example."""
    o = options
    global_crops = np.stack(
        [
            random_resized_crop(image, rng, o.global_size, o.global_scale, o, o.blur_prob[i])
            for i in range(2)
        ]
    )
    local_crops = (
        np.stack(
            [
                random_resized_crop(image, rng, o.local_size, o.local_scale, o, o.blur_prob[2])
                for _ in range(o.num_local)
            ]
        )
        if o.num_local
        else np.zeros((0, o.local_size, o.local_size), np.uint8)
    )
    masks = np.zeros((2, o.grid**2), bool)
    for i in range(2):
        if rng.random() < o.mask_prob:
            ratio = rng.uniform(*o.mask_ratio)
            masks[i] = block_mask(rng, o.grid, min(int(ratio * o.grid**2), o.max_masked))
    return {"global": global_crops, "local": local_crops, "mask": masks}


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch, n, _DOMAIN)).permutation(n)
    order.flags.writeable = False
    return order


class MultiCropBatch:
    """Global step -> this process's rows of that global batch, as multi-crop arrays.

    Examples of several sources are pooled (one index space, in the order of the sources).
    Batches: global uint8 (b, 2, G, G), local uint8 (b, N, L, L), mask bool (b, 2, (G/p)^2),
    index int32 (b,) (the pooled record).
    """

    def __init__(
        self,
        infos: Sequence[shards.DatasetInfo],
        *,
        batch_size: int,
        seed: int,
        options: CropOptions,
        splits: Sequence[str] = ("train",),
    ):
        self._files = [f for info in infos for s in splits for f in info.files(s)]
        self._sources = [
            grain.sources.ArrayRecordDataSource(info.files(s))
            for info in infos
            for s in splits
            if info.splits.get(s, {}).get("num_examples")
        ]
        sizes = [len(s) for s in self._sources]
        self._offsets = np.cumsum([0, *sizes])
        self._num_examples = int(self._offsets[-1])
        if self._num_examples < batch_size:
            raise ConfigError(
                f"batch size {batch_size} exceeds the {self._num_examples} images of the "
                f"{'/'.join(splits)} split(s)",
                "Lower config.batch_size or add data (config.data.sources).",
            )
        self._batch_size = batch_size
        self._local = pipeline.local_batch_size(batch_size)
        self._seed = seed
        self._options = options
        self.steps_per_epoch = self._num_examples // batch_size

    @property
    def fingerprint(self) -> dict:
        o = self._options
        return {
            "seed": self._seed,
            "batch_size": self._batch_size,
            "num_examples": self._num_examples,
            "crops": [o.global_size, o.local_size, o.num_local, o.patch_size],
        }

    def records(self, step: int) -> tuple[int, np.ndarray]:
        import jax

        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self._batch_size + jax.process_index() * self._local
        order = _permutation(self._seed, epoch, self._num_examples)
        return epoch, order[start : start + self._local]

    def _read(self, record: int) -> np.ndarray:
        s = int(np.searchsorted(self._offsets, record, side="right")) - 1
        raw = self._sources[s][int(record - self._offsets[s])]
        try:
            return shards.decode(raw)["image"]
        except (shards.ShardError, ValueError) as e:
            raise shards.ShardError(
                f"a corrupt record in {self._files} ({e}); re-run tools/prepare_data.py"
            ) from e

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, records = self.records(step)
        examples = []
        for record in records.tolist():
            rng = np.random.default_rng((self._seed, epoch, record, _DOMAIN))
            examples.append(example_crops(self._read(record), rng, self._options))
        out = {k: np.stack([e[k] for e in examples]) for k in ("global", "local", "mask")}
        out["index"] = records.astype(np.int32)
        return out


def multicrop_loader(
    infos: Sequence[shards.DatasetInfo],
    *,
    batch_size: int,
    seed: int,
    options: CropOptions,
    splits: Sequence[str] = ("train",),
    worker_count: int = 0,
    threads: int | None = None,
) -> tuple[pipeline.TrainLoader, int]:
    """(an endless, resumable loader of multi-crop batches, steps per epoch)."""
    batches = MultiCropBatch(
        infos, batch_size=batch_size, seed=seed, options=options, splits=splits
    )
    if threads is None:
        threads = min(8, len(os.sched_getaffinity(0)))
    loader = pipeline.TrainLoader(batches, threads=threads, worker_count=worker_count)
    return loader, batches.steps_per_epoch
