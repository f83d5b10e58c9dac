"""Host (cv2, uint8) and device (jax, float32) augmentation: exact cases, twins, distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrjax.data import device_augment as da
from cxrjax.data import pipeline

SIZE = 48
ALL_ON = da.Augment(
    flip_prob=0.5,
    max_rotation=7.0,
    crop_area=(0.4, 1.0),
    translate=0.08,
    scale=0.1,
    shear=5.0,
    brightness=0.1,
    contrast=0.2,
    gamma=0.3,
)


def _image(size=SIZE):
    """Smooth and left-right asymmetric, so flips and warps change the statistics."""
    y, x = np.mgrid[0:size, 0:size] / size
    return np.clip(40 + 150 * x + 50 * np.sin(6 * y) * np.cos(4 * x), 0, 255).astype(np.uint8)


def _uniforms(count, seed=0):
    return np.random.default_rng(seed).random((count, da.NUM_UNIFORMS))


def _host(image, u, augment):
    return pipeline.augment_images([image] * len(u), u, augment)


_apply = jax.jit(da.apply, static_argnums=2)


def _device(image, u, augment):
    images = jnp.asarray(np.stack([image] * len(u)))
    return np.asarray(_apply(images, jnp.asarray(u, jnp.float32), augment))


def test_uniforms_are_uniform_and_independent():
    u = pipeline.example_uniforms(0, 0, np.arange(20_000))
    assert u.shape == (20_000, da.NUM_UNIFORMS) and u.min() >= 0 and u.max() < 1
    np.testing.assert_allclose(u.mean(0), 0.5, atol=0.01)
    np.testing.assert_allclose(u.var(0), 1 / 12, atol=0.003)
    correlation = np.corrcoef(u.T) - np.eye(da.NUM_UNIFORMS)
    assert np.abs(correlation).max() < 0.03
    # Neighbouring records are as unrelated as distant ones.
    assert abs(np.corrcoef(u[:-1, 1], u[1:, 1])[0, 1]) < 0.03
    np.testing.assert_array_equal(
        pipeline.example_uniforms(0, 0, np.array([7])), u[7:8]
    )  # a row depends on its record only, not on the batch around it
    assert not np.array_equal(pipeline.example_uniforms(1, 0, np.arange(3)), u[:3])


@pytest.mark.parametrize("path", [_host, _device])
def test_flip_only_and_identity_are_exact(path):
    image = _image()
    u = _uniforms(6)
    flips = u[:, 0] < 0.5
    assert flips.any() and not flips.all()
    out = path(image, u, da.Augment(flip_prob=0.5, max_rotation=0.0))
    for row, flip in enumerate(flips):
        np.testing.assert_array_equal(out[row], image[:, ::-1] if flip else image)
    np.testing.assert_array_equal(path(image, u, da.Augment(0.0, 0.0)), np.stack([image] * 6))
    # Through the resampling path too: a zero-angle warp of pixel centres copies them.
    zero_angle = da.Augment(flip_prob=1.0, max_rotation=1.0)
    u_zero = u.copy()
    u_zero[:, 1] = 0.5
    np.testing.assert_array_equal(path(image, u_zero, zero_angle), np.stack([image[:, ::-1]] * 6))


@pytest.mark.parametrize("path", [_host, _device])
def test_warps_have_their_geometric_meaning(path):
    image = _image()
    u = np.full((1, da.NUM_UNIFORMS), 0.5)
    u[0, 0] = 1.0  # no flip
    u[0, 1] = 1.0  # the largest angle: +90 degrees
    rotated = path(image, u, da.Augment(flip_prob=0.0, max_rotation=90.0))[0]
    np.testing.assert_allclose(rotated, np.rot90(image, k=-1), atol=0.51)

    u = np.full((1, da.NUM_UNIFORMS), 0.5)
    u[0, 6] = 1.0  # translate right by the full +-25%
    shifted = path(image, u, da.Augment(flip_prob=0.0, max_rotation=0.0, translate=0.25))[0]
    np.testing.assert_allclose(shifted[:, SIZE // 4 :], image[:, : -SIZE // 4], atol=0.51)
    assert (shifted[:, : SIZE // 4] == 0).all()

    u = np.zeros((1, da.NUM_UNIFORMS))
    u[0, 0] = 1.0  # crop a quarter of the area, square, at the top-left corner
    crop = da.Augment(flip_prob=0.0, max_rotation=0.0, crop_area=(0.25, 0.25), crop_ratio=(1, 1))
    zoomed = path(image, u, crop)[0].astype(float)
    half = image[: SIZE // 2, : SIZE // 2].astype(float)
    # Output pixel 2i + 1 of a 2x zoom samples input i + 0.25: interpolate the quarter.
    expected = 0.75 * half[:-1, :] + 0.25 * half[1:, :]
    expected = 0.75 * expected[:, :-1] + 0.25 * expected[:, 1:]
    np.testing.assert_allclose(zoomed[1:-1:2, 1:-1:2], expected, atol=0.6)


@pytest.mark.parametrize("augment", [da.Augment(), ALL_ON], ids=["study", "all_on"])
def test_host_and_device_are_twins_given_the_same_draws(augment):
    image = _image()
    u = _uniforms(32, seed=1)
    host = _host(image, u, augment).astype(np.float32)
    device = _device(image, u, augment)
    assert device.dtype == np.float32 and device.min() >= 0 and device.max() <= 255
    difference = np.abs(host - device)
    # The host rounds to uint8 (and cv2 interpolates in 1/32 pixel steps): about one grey level.
    assert difference.max() <= 2.0 and difference.mean() < 0.35


def test_intensity_changes_match_and_move_the_image():
    image = _image()
    u = _uniforms(16, seed=2)
    augment = da.Augment(flip_prob=0.0, max_rotation=0.0, brightness=0.2, contrast=0.3, gamma=0.5)
    host = _host(image, u, augment).astype(np.float32)
    device = _device(image, u, augment)
    assert np.abs(host - device).max() <= 0.51
    assert np.abs(device - image).mean(axis=(1, 2)).min() > 1.0  # every draw changes the image


@pytest.mark.parametrize("augment", [da.Augment(), ALL_ON], ids=["study", "all_on"])
def test_host_and_device_draws_give_the_same_distribution(augment):
    """Host draws come from the pipeline's hash, device draws from jax.random: same law."""
    image = _image(32)
    count = 2048
    host = _host(image, pipeline.example_uniforms(5, 0, np.arange(count)), augment)
    device_fn = jax.jit(functools.partial(da.device_augment, augment=augment))
    device = np.asarray(device_fn(jnp.asarray(np.stack([image] * count)), jax.random.key(5)))
    host = host.astype(np.float64)
    for name, stat in {
        "mean": lambda x: x.mean(axis=(1, 2)),
        "std": lambda x: x.std(axis=(1, 2)),
        "left-right": lambda x: x[:, :, :16].mean(axis=(1, 2)) - x[:, :, 16:].mean(axis=(1, 2)),
        "corner": lambda x: x[:, :4, :4].mean(axis=(1, 2)),
    }.items():
        a, b = stat(host), stat(device)
        # Means agree within 4 standard errors (plus half a grey level for uint8 rounding) ...
        standard_error = np.sqrt(a.var() / count + b.var() / count)
        assert abs(a.mean() - b.mean()) < 4 * standard_error + 0.5, name
        # ... and so do the spreads.
        assert abs(a.std() - b.std()) < 0.1 * max(a.std(), b.std()) + 0.5, name


def test_device_augment_is_deterministic_per_key_and_jits():
    images = jnp.asarray(np.stack([_image()] * 8))
    fn = jax.jit(da.device_augment, static_argnums=2)
    a = fn(images, jax.random.key(0), da.Augment())
    b = fn(images, jax.random.key(0), da.Augment())
    c = fn(images, jax.random.key(1), da.Augment())
    assert a.dtype == jnp.float32 and a.shape == images.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # Every image in the batch gets its own draw.
    assert len({np.asarray(a[i]).tobytes() for i in range(8)}) == 8
    plain = fn(images, jax.random.key(0), da.Augment(0.0, 0.0))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(images, np.float32))


def test_device_augment_on_a_sharded_batch_matches_one_device():
    """Draws depend on the key and the row only, not on how the batch is split over devices."""
    from cxrjax import sharding

    mesh = sharding.make_mesh()
    images = np.stack([_image()] * 8)
    sharded = jax.device_put(images, sharding.data_sharding(mesh))
    fn = jax.jit(da.device_augment, static_argnums=2)
    out = fn(sharded, jax.random.key(3), ALL_ON)
    assert len(out.sharding.device_set) == 4
    single = fn(jax.device_put(images, jax.devices()[0]), jax.random.key(3), ALL_ON)
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-3)
