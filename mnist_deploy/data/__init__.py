"""Data: MNIST's IDX files (checked, downloaded, cached as tensors) and the one MNIST-style image preprocessing."""

from .images import MAX_IMAGE_PIXELS, check_image_header, mnist_image, pixels_to_array, preprocess_image
from .mnist import (
    MEAN,
    STD,
    load_raw,
    load_splits,
    manifest_normalization,
    normalize,
    normalize_pixels,
    summary,
)

__all__ = [
    "MAX_IMAGE_PIXELS", "MEAN", "STD", "check_image_header", "load_raw", "load_splits", "manifest_normalization",
    "mnist_image", "normalize", "normalize_pixels", "pixels_to_array", "preprocess_image", "summary",
]
