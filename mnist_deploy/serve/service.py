"""The prediction service: the model, its limits and its metrics, with no knowledge of HTTP.

Every protocol the server speaks (our JSON at ``/predict``, uploads, the Open Inference Protocol at
``/v2``) is a thin translation onto these methods. They take Python values, return plain dicts, and
raise typed errors (:class:`NotReady`, :class:`~mnist_deploy.errors.InputError` and the parsing
errors), which the HTTP layer maps to status codes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..data.images import check_image_header, pixels_to_array, preprocess_image
from ..data.mnist import manifest_normalization, normalize_pixels
from ..errors import InputError
from ..predict import LoadedModel
from .batching import BatcherClosed, DynamicBatcher
from .metrics import Metrics


class NotReady(Exception):
    """The model is not loaded yet."""


def softmax(z: np.ndarray) -> np.ndarray:
    """Logits -> float64 probability rows, computed as :meth:`LoadedModel.probabilities` does."""
    z = z.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Service:
    """The model, the metrics and the limits; turns request values into prediction answers."""

    def __init__(self, model: LoadedModel | None, *, max_body_bytes: int, max_image_pixels: int, max_batch: int,
                 routes: tuple[str, ...] = ()) -> None:
        self.model = model
        self.metrics = Metrics(routes)
        self.max_body_bytes = max_body_bytes
        self.max_image_pixels = max_image_pixels
        self.max_batch = max_batch
        self.batcher: DynamicBatcher | None = None

    def start_batching(self, *, max_batch_size: int, max_queue_delay_us: int,
                       preferred_batch_sizes: tuple[int, ...] = ()) -> None:
        """Route model calls of /predict, /predict/batch and v2 infer through a :class:`DynamicBatcher` (the
        model must be loaded). Requests are validated before they are queued, so a bad one never
        reaches a batch; one model call runs at a time, inline on the event loop."""
        m = self.ready()
        self.batcher = DynamicBatcher(lambda x: self.logits(m, x), max_batch_size=max_batch_size,
                                      max_queue_delay_us=max_queue_delay_us,
                                      preferred_batch_sizes=preferred_batch_sizes, on_batch=self.metrics.batched)

    async def stop_batching(self) -> None:
        if self.batcher is not None:
            await self.batcher.close(drain=True)

    async def batched_logits(self, m: LoadedModel, x: np.ndarray) -> np.ndarray:
        """Logits of ``x`` through the batcher when batching is on, else one direct call."""
        if self.batcher is None:
            return self.logits(m, x)
        return await self.batcher.infer(x)

    def ready(self) -> LoadedModel:
        if self.model is None:
            raise NotReady("model not loaded yet")
        return self.model

    def run(self, m: LoadedModel, x: np.ndarray) -> np.ndarray:
        """Probabilities of a normalised float32 (N, 784) batch, timed for the metrics."""
        t0 = time.perf_counter()
        probs = m.probabilities(x)
        self.metrics.inferred(m.runtime, x.shape[0], time.perf_counter() - t0)
        return probs

    def logits(self, m: LoadedModel, x: np.ndarray) -> np.ndarray:
        """Logits of a normalised float32 (N, 784) batch, timed for the metrics."""
        t0 = time.perf_counter()
        z = m.logits(x)
        self.metrics.inferred(m.runtime, x.shape[0], time.perf_counter() - t0)
        return z

    def normalize(self, m: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        """0..255 pixels -> the model's input, with the mean and std the model was trained with."""
        return normalize_pixels(pixels, **manifest_normalization(m.manifest))

    # -- our JSON ------------------------------------------------------------------------------

    def predict_pixels(self, values: Any) -> dict:
        """One image of 784 raw pixel values -> its prediction."""
        t0 = time.perf_counter()
        m = self.ready()
        return single_answer(self.answer(m, self.run(m, self.normalize(m, pixels_to_array(values))), t0))

    async def predict_pixels_batched(self, values: Any) -> dict:
        """:meth:`predict_pixels` with the model call in the next dynamic batch."""
        t0 = time.perf_counter()
        m = self.ready()
        x = self.normalize(m, pixels_to_array(values))  # validated here: a bad request never joins a batch
        return single_answer(await self.predict_rows(m, x, t0))

    async def predict_pixel_batch(self, rows: Any) -> dict:
        """A JSON list of images -> their predictions (through the dynamic batcher when it is on)."""
        m = self.ready()
        t0 = time.perf_counter()
        if isinstance(rows, list) and len(rows) > self.max_batch:
            raise InputError(f"at most {self.max_batch} images per batch, got {len(rows)}")
        out = await self.predict_rows(m, self.normalize(m, pixels_to_array(rows, batch=True)), t0)
        out["count"] = len(out["predictions"])
        return out

    async def predict_rows(self, m: LoadedModel, x: np.ndarray, t0: float) -> dict:
        """Predictions for validated, normalised rows: one model call, or the rows' place in the next
        dynamic batch (a request larger than the batch cap runs alone, never split)."""
        probs = softmax(await self.batched_logits(m, x)) if self.batcher is not None else self.run(m, x)
        return self.answer(m, probs, t0)

    @staticmethod
    def answer(m: LoadedModel, probs: np.ndarray, t0: float) -> dict:
        """Our JSON answer for rows of probabilities: ``predictions``, ``runtime``, ``latency_ms`` since ``t0``."""
        return {"predictions": [result(p) for p in probs], "runtime": m.runtime,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}

    # -- uploaded images -----------------------------------------------------------------------

    def check_images(self, files: list[tuple[str, bytes]]) -> None:
        """Refuse at once what cannot be decoded cheaply: read each image's header, check its pixel count."""
        for i, (name, blob) in enumerate(files):
            try:
                check_image_header(blob, max_pixels=self.max_image_pixels, name=name)
            except InputError as exc:
                raise type(exc)(f"image {i} ({exc})" if len(files) > 1 else str(exc)) from None

    def decode_images(self, model: LoadedModel, files: list[tuple[str, bytes]]) -> np.ndarray:
        """Uploaded images (name, bytes) -> normalised rows; run it in a worker thread (decoding is slow)."""
        rows = []
        for i, (name, blob) in enumerate(files):
            try:
                rows.append(preprocess_image(blob, max_pixels=self.max_image_pixels, name=name,
                                             **manifest_normalization(model.manifest)))
            except InputError as exc:
                raise InputError(f"image {i} ({exc})" if len(files) > 1 else str(exc)) from None
        return np.concatenate(rows)

    # -- what is served ------------------------------------------------------------------------

    def health(self) -> dict | None:
        """The health answer, or None while the model loads."""
        m = self.model
        if m is None:
            return None
        return {"status": "ok", "runtime": m.runtime, "model": m.manifest["model"]["name"], "pid": os.getpid()}

    def model_info(self) -> dict:
        """The format, file, sha256, metrics and parity of the served artifact, from the manifest."""
        m = self.ready()
        e = m.entry
        return {
            "runtime": m.runtime, "engine": m.predictor.runtime, "device": m.device, "threads": m.threads,
            "format": e.get("format"), "file": e.get("path"), "sha256": e.get("sha256"),
            "size_bytes": e.get("size_bytes"), "parity": e.get("parity"), "options": e.get("options"),
            "model": m.manifest.get("model"), "metrics": m.manifest.get("metrics"),
            "preprocessing": m.manifest.get("preprocessing"), "versions": m.manifest.get("versions"),
            "load_seconds": round(m.load_seconds, 4),
            "limits": {"max_body_bytes": self.max_body_bytes, "max_image_pixels": self.max_image_pixels,
                       "max_batch": self.max_batch},
        }

    def model_labels(self) -> dict[str, str] | None:
        m = self.model
        if m is None:
            return None
        return {"model": m.manifest["model"]["name"], "runtime": m.runtime, "engine": m.predictor.runtime,
                "sha256": str(m.entry.get("sha256", "")), "device": m.device}

    def render_metrics(self) -> str:
        return self.metrics.render(self.model_labels())


def single_answer(answer: dict) -> dict:
    """A one-image answer: the image's prediction with ``runtime`` and ``latency_ms`` beside it."""
    return {**answer.pop("predictions")[0], **answer}


def result(probs: np.ndarray) -> dict:
    """One probability row -> our JSON answer: the digit, its confidence and the ten probabilities."""
    digit = int(probs.argmax())
    return {"digit": digit, "confidence": round(float(probs[digit]), 6),
            "probabilities": [round(p, 6) for p in probs.tolist()]}


__all__ = ["BatcherClosed", "NotReady", "Service", "result", "single_answer", "softmax"]
