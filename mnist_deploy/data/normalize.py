"""The one normalisation of MNIST pixels (training, predict and serve all call it) and the manifest's
record of it."""

from __future__ import annotations

import numpy as np

MEAN = 0.1307
STD = 0.3081



def normalize_pixels(pixels: np.ndarray, *, mean: float = MEAN, std: float = STD) -> np.ndarray:
    """(N, 28, 28) or (N, 784) pixel values in 0..255 -> float32 (N, 784): ``(x / 255 - mean) / std``.

    The one normalisation: training (the cached tensors), ``predict`` and ``serve`` all call it, so
    a pixel value becomes the same float32 bits everywhere. Computed in float32, in this order.
    """
    return scale(np.asarray(pixels, dtype=np.float32).reshape(-1, 28 * 28), mean, std)



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
