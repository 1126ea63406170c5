"""Predict digits from real images: model loading and file prediction.

Images go through the one MNIST-style preprocessing in :mod:`mnist_deploy.data.images` (re-exported
here as part of the public API), the same function ``serve`` uses, so a digit is seen the same way
everywhere.

Models are loaded through the manifest only: an exported artifact after its sha256 has been checked
(:func:`formats.open_artifact`), or the eager PyTorch model from the state_dict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts.manifest import load_manifest
from .data.images import (
    FIELD,
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    check_image_header,
    mnist_image,
    pixels_to_array,
    preprocess_image,
)
from .data.mnist import manifest_normalization, normalize_pixels
from .errors import InputError, ManifestError, MnistDeployError, first_line
from .formats import DEFAULT_RUNTIME, LoadError, Predictor, format_names, open_artifact
from .formats.artifact import artifact_entry_checked

EAGER_RUNTIME = "pytorch"


# ---------------------------------------------------------------------------------------------
# Models.


def softmax(logits: np.ndarray) -> np.ndarray:
    """Logit rows -> float64 probability rows summing to 1 (the one softmax: predict and serve use it)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


@dataclass
class LoadedModel:
    """A model loaded for prediction, with what the manifest says about it."""

    predictor: Predictor
    runtime: str  # the --runtime name: a format in the registry, or "pytorch"
    entry: dict  # the manifest entry of the file that was loaded
    manifest: dict
    input_shape: tuple[int, ...]
    device: str = "cpu"
    threads: int | None = None
    load_seconds: float = 0.0

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 784) normalised -> float32 logits (N, 10)."""
        return self.predictor(x.reshape(x.shape[0], *self.input_shape))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 784) normalised -> softmax probabilities (N, 10), float64 rows summing to 1."""
        return softmax(self.logits(x))


def load_model(*, artifacts: str | os.PathLike = "artifacts", runtime: str = DEFAULT_RUNTIME,
               device: str = "cpu", threads: int | None = None) -> LoadedModel:
    """Load the model in ``artifacts`` for ``runtime``, once, after checking its sha256 against the manifest.

    ``runtime`` is a format name from the registry (``onnx``, ``pt2``, ``openvino``, ..., or
    ``pytorch``: the eager model rebuilt from the state_dict). ``threads`` sets the runtime's
    intra-op threads (None: the runtime's default); torch's global thread count is left as it was.
    """
    folder = Path(artifacts)
    if runtime not in format_names():  # --runtime takes format names (bench's rows use runtime names)
        raise InputError(f"unknown runtime '{runtime}'; choose one of {', '.join(format_names())}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such artifacts folder; run `mnist-deploy train --out {folder}` first")
    manifest = load_manifest(folder)
    model_info = manifest["model"]
    input_shape = tuple(int(d) for d in model_info.get("input_shape") or (FIELD * FIELD,))
    if int(np.prod(input_shape)) != FIELD * FIELD:
        raise ManifestError(f"{folder / 'manifest.json'}: model input shape {input_shape} is not a 28x28 image")
    device = _resolve_device(device)
    entry = artifact_entry_checked(manifest, runtime, folder, advice=f", or use --runtime {EAGER_RUNTIME}")
    t0 = time.perf_counter()
    predictor = open_artifact(manifest, runtime, folder, device=device, threads=threads)
    loaded = LoadedModel(predictor, runtime, dict(entry), manifest, input_shape, device, threads,
                         time.perf_counter() - t0)
    try:
        loaded.probabilities(np.zeros((1, FIELD * FIELD), dtype=np.float32))  # warm-up: first call allocates
    except MnistDeployError:
        raise
    except Exception as exc:  # a runtime that loads lazily fails here on a damaged file
        raise LoadError(f"{folder / entry['path']}: {predictor.runtime} loaded it but cannot run it ({first_line(exc)})") from None
    return loaded


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"  # no torch import: the ONNX Runtime path starts without it
    from .devices import resolve_device

    return str(resolve_device(device))


# ---------------------------------------------------------------------------------------------
# Files.


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded to the image files in them (by suffix, recursively, sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def _refuse_special_file(path: Path) -> None:
    """A named input must be a regular file (folders were expanded already): opening a FIFO blocks until
    a writer comes (``predict`` hung until killed), a character device can be endless (/dev/zero)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: reading it says so, in the usual words
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(f"{path}: {kind}, not an image file; name image files or folders of them")


def top_k(probabilities: np.ndarray, k: int) -> list[dict]:
    """The ``k`` most probable digits of one probability row, best first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"digit": int(d), "probability": float(probabilities[d])} for d in order]


def predict_files(inputs: Sequence[str | os.PathLike], *, artifacts: str | os.PathLike = "artifacts",
                  runtime: str = DEFAULT_RUNTIME, top: int = 3, device: str = "cpu", threads: int | None = None,
                  model: LoadedModel | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                  batch_size: int = 256) -> list[dict]:
    """Predict the digit in every image file (folders are expanded), one record per file, in order.

    A file that cannot be read or holds no digit gets a record with ``error`` instead of a
    prediction; the others are still predicted. Model problems (no artifact, tampered file) raise.
    """
    if not 1 <= top <= 10:
        raise InputError(f"top-k must be between 1 and 10, got {top}")
    files = expand_inputs(inputs)
    if not files:
        raise InputError("no image files found in " + ", ".join(str(p) for p in inputs))
    model = model or load_model(artifacts=artifacts, runtime=runtime, device=device, threads=threads)
    norm = manifest_normalization(model.manifest)
    records: list[dict] = []
    pending: list[tuple[dict, np.ndarray]] = []
    for path in files:
        record: dict[str, Any] = {"file": str(path)}
        records.append(record)
        try:
            _refuse_special_file(path)
            pending.append((record, preprocess_image(path, max_pixels=max_pixels, **norm)))
        except MnistDeployError as exc:
            record["error"] = str(exc)
    for i in range(0, len(pending), batch_size):
        chunk = pending[i : i + batch_size]
        probs = model.probabilities(np.concatenate([x for _, x in chunk]))
        for (record, _), p in zip(chunk, probs, strict=True):
            best = top_k(p, top)
            record.update(digit=best[0]["digit"], confidence=best[0]["probability"], top_k=best,
                          runtime=model.runtime)
    return records




__all__ = [
    "DEFAULT_RUNTIME", "EAGER_RUNTIME", "MAX_IMAGE_PIXELS", "LoadedModel", "check_image_header", "expand_inputs",
    "load_model", "mnist_image", "normalize_pixels", "pixels_to_array", "predict_files", "preprocess_image",
    "softmax", "top_k",
]
