"""The one normalisation: uint8 pixels by table lookup give the same float32 bits as the arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_deploy.data import mnist
from mnist_deploy.data.normalize import TABLE_ROWS, normalize_pixels, pixel_table, scale


def computed(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The arithmetic, element by element, as the non-table path does it."""
    return scale(np.asarray(pixels, np.float32).reshape(-1, 784), mean, std)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32),
                                                                                      b.view(np.uint32))


@pytest.mark.parametrize("mean, std", [(mnist.MEAN, mnist.STD), (0.5, 0.25), (0.0, 1.0), (0.1, 0.3)])
@pytest.mark.parametrize("rows", [1, 2, TABLE_ROWS, TABLE_ROWS + 1, 64])
def test_uint8_pixels_get_the_bits_of_the_arithmetic(mean, std, rows):
    rng = np.random.default_rng(rows)
    pixels = rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8)
    pixels[0].flat[:256] = np.arange(256)  # every value, wherever it stands
    got = normalize_pixels(pixels, mean=mean, std=std)
    assert same_bits(got, computed(pixels, mean, std))
    assert got.flags.writeable and got.flags.c_contiguous  # a fresh array, not a view of the table
    assert same_bits(normalize_pixels(pixels.reshape(rows, 784), mean=mean, std=std), got)


def test_the_table_path_is_taken_for_small_uint8_batches_only():
    """A table that disagreed with the arithmetic would show here: the table is what small batches read."""
    table = pixel_table(0.5, 0.25)
    assert not table.flags.writeable
    assert same_bits(table, scale(np.arange(256, dtype=np.float32), 0.5, 0.25))
    one = np.full((1, 784), 7, np.uint8)
    assert set(normalize_pixels(one, mean=0.5, std=0.25).ravel().tolist()) == {float(table[7])}


def test_real_mnist_images_normalise_identically(mnist_dir):
    images = mnist.load_raw(mnist_dir, allow_download=False).arrays["test-images"][:TABLE_ROWS]
    assert images.dtype == np.uint8
    assert same_bits(normalize_pixels(images), computed(images, mnist.MEAN, mnist.STD))


def test_other_dtypes_are_computed():
    floats = np.arange(784, dtype=np.float64).reshape(1, 784) % 256
    assert same_bits(normalize_pixels(floats), computed(floats, mnist.MEAN, mnist.STD))
    ints = (np.arange(784).reshape(1, 784) % 256).tolist()
    assert same_bits(normalize_pixels(np.asarray(ints)), computed(np.asarray(ints), mnist.MEAN, mnist.STD))
