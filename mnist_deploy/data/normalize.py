"""The one normalisation of MNIST pixels (training, predict and serve all call it) and the manifest's
record of it."""

from __future__ import annotations

import functools

import numpy as np

MEAN = 0.1307
STD = 0.3081
TABLE_ROWS = 8  # uint8 batches of at most this many images are normalised by table lookup (pixel_table)



def normalize_pixels(pixels: np.ndarray, *, mean: float = MEAN, std: float = STD) -> np.ndarray:
    """(N, 28, 28) or (N, 784) pixel values in 0..255 -> float32 (N, 784): ``(x / 255 - mean) / std``.

    The one normalisation: training (the cached tensors), ``predict`` and ``serve`` all call it, so
    a pixel value becomes the same float32 bits everywhere. Computed in float32, in this order. uint8
    pixels take their values from :func:`pixel_table`, the same arithmetic done once per pixel value
    (elementwise float32 operations give a value the same bits wherever it stands): for a few rows (at
    most :data:`TABLE_ROWS`, a served request's usual size) one lookup is about half the time of a
    conversion and three passes; larger batches are faster computed.
    """
    if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.size <= TABLE_ROWS * 28 * 28:
        return pixel_table(float(mean), float(std)).take(pixels.reshape(-1, 28 * 28))
    return scale(np.asarray(pixels, dtype=np.float32).reshape(-1, 28 * 28), mean, std)


@functools.lru_cache(maxsize=16)
def pixel_table(mean: float, std: float) -> np.ndarray:
    """The normalised float32 value of each pixel value 0..255, read-only: :func:`scale` of 0..255."""
    table = scale(np.arange(256, dtype=np.float32), mean, std)
    table.flags.writeable = False
    return table



def scale(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return (x / np.float32(255.0) - np.float32(mean)) / np.float32(std)



def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H*W) with the training mean and std, as :func:`normalize_pixels`."""
    x = np.asarray(images, dtype=np.float32)
    return scale(x.reshape(len(x), -1), MEAN, STD)



def manifest_normalization(manifest: dict) -> dict[str, float]:
    """``{"mean": ..., "std": ...}`` from a manifest's ``preprocessing`` (the training values if absent)."""
    from ..errors import ManifestError

    pre = manifest.get("preprocessing") if isinstance(manifest, dict) else None
    pre = pre if isinstance(pre, dict) else {}
    out = {"mean": pre.get("mean", MEAN), "std": pre.get("std", STD)}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ManifestError(f"manifest.json: preprocessing.{key} must be a finite number, got {value!r}")
    if out["std"] <= 0:
        raise ManifestError(f"manifest.json: preprocessing.std must be positive, got {out['std']!r}")
    scale = pre.get("scale", 1 / 255)
    if scale != 1 / 255:
        raise ManifestError(f"manifest.json: preprocessing.scale {scale!r} is not 1/255, the only scale supported")
    return {"mean": float(out["mean"]), "std": float(out["std"])}
