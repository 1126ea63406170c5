"""The prediction service: the model, its limits and its metrics, with no knowledge of HTTP.

Every protocol the server speaks (our JSON at ``/predict``, uploads, the Open Inference Protocol at
``/v2``) is a thin translation onto these methods. They take Python values, return plain dicts, and
raise typed errors from :mod:`mnist_deploy.errors`, each carrying its HTTP status.

One request path: every model call goes through ``self.batcher``, a
:class:`~.batching.DynamicBatcher` when batching is on and a :class:`~.batching.PassThrough` (one
direct, inline call) when it is off, so nothing here forks on the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np

from ..data.images import check_image_header, pixels_to_array, preprocess_image
from ..data.mnist import manifest_normalization, normalize_pixels
from ..errors import BatcherClosed, InputError, NotReady
from ..predict import LoadedModel, softmax
from .batching import DynamicBatcher, PassThrough, make_batcher
from .config import ServeConfig
from .metrics import Metrics

# PNG text chunks (tEXt/zTXt/iTXt) and ICC profiles are inflated by Image.open, before any size
# check: a 3 KB PNG with three zTXt chunks inflated 3 MB of text with Pillow's default limits. A digit
# needs none of it; these caps make a header read cheap whatever the chunks claim.
MAX_PNG_TEXT_CHUNK = 64 << 10
MAX_PNG_TEXT_MEMORY = 256 << 10
WARMUP_CALLS = 3  # model calls per warm-up batch size
_LOG = logging.getLogger("uvicorn.error")


def bound_image_metadata() -> None:
    """Cap how much PNG text Pillow inflates while reading a header (process-wide Pillow settings)."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_PNG_TEXT_CHUNK)
    PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, MAX_PNG_TEXT_MEMORY)


class Service:
    """The model, the metrics and the limits; turns request values into prediction answers."""

    def __init__(self, model: LoadedModel | None, config: ServeConfig | None = None, *,
                 routes: tuple[str, ...] = ()) -> None:
        self.model = model
        self.config = config = config or ServeConfig()
        self.metrics = Metrics(routes)
        self.max_body_bytes = config.max_body_bytes
        self.max_image_pixels = config.max_image_pixels
        self.max_batch = config.max_batch
        self.draining = False  # set at SIGTERM: readiness answers 503 from then on
        self.on_drain: list[Callable[[], None]] = []  # called by begin_drain (the gRPC server's stop)
        self.warm = False  # set once warm_up() has run: readiness answers 503 until then
        self.warming: asyncio.Event | None = None  # set while warm_up() runs; requests wait for it
        self.warm_error: str | None = None
        self._warm_task: asyncio.Task | None = None
        self._norm: tuple[LoadedModel, dict[str, float]] | None = None  # (model, its manifest's mean and std)
        self.batcher: DynamicBatcher | PassThrough = PassThrough(lambda x: self.logits(self.ready(), x))

    def start(self) -> None:
        """Put the configured batcher in front of the (loaded) model and start :meth:`warm_up` in the
        background (call it on the server's event loop). Requests are validated before they are queued,
        so a bad one never reaches a batch; one model call runs at a time, inline on the loop."""
        m = self.ready()
        c = self.config
        self.batcher = make_batcher(lambda x: self.logits(m, x), max_batch_size=c.max_batch_size,
                                    max_queue_delay_us=c.max_queue_delay_us,
                                    preferred_batch_sizes=c.preferred_batch_sizes, on_batch=self.metrics.batched)
        # Warmed up in the background: the server answers liveness meanwhile, readiness after it.
        self.warming = asyncio.Event()
        self._warm_task = asyncio.get_running_loop().create_task(self._warm_up_quietly(), name="warm-up")

    async def _warm_up_quietly(self) -> None:
        with contextlib.suppress(Exception):  # logged by warm_up(); readiness then stays false
            await self.warm_up()

    async def stop(self) -> None:
        if self._warm_task is not None:
            self._warm_task.cancel()
        await self.batcher.close(drain=True)

    def warm_up_sizes(self) -> tuple[int, ...]:
        """The batch sizes the model is warmed up at: 1 and the batcher's largest batch."""
        return tuple(sorted({1, self.batcher.max_batch_size}))

    async def warm_up(self, calls: int = WARMUP_CALLS) -> dict[int, float]:
        """A few model calls at each of :meth:`warm_up_sizes`, timed and logged in one line; readiness
        turns true after them. Returns the median seconds per call by batch size.

        They run in a worker thread, so that the event loop keeps answering liveness while a runtime
        compiles or allocates on its first calls; requests that reach :meth:`infer` meanwhile wait for
        them. They call the model directly: the metrics count only requests."""
        m = self.ready()
        self.warming = self.warming or asyncio.Event()
        try:
            x = self.normalize(m, np.zeros((max(self.warm_up_sizes()), 784), np.float32))
            t0 = time.perf_counter()
            per_call = await anyio.to_thread.run_sync(_time_calls, m, x, self.warm_up_sizes(), calls)
            self.warm = True
            sizes = ", ".join(f"batch {n} {s * 1e3:.2f} ms" for n, s in per_call.items())
            _LOG.info("warm-up: %d calls at each of batch sizes %s in %.1f ms (median per call: %s); ready",
                      calls, list(per_call), (time.perf_counter() - t0) * 1e3, sizes)
            return per_call
        except Exception as exc:
            self.warm_error = f"warm-up failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _LOG.error("%s; readiness stays false", self.warm_error)
            raise
        finally:
            self.warming.set()
            self.warming = None

    def begin_drain(self) -> None:
        """Readiness false from now on, and the other protocols told (may run in a signal handler)."""
        self.draining = True
        for hook in self.on_drain:
            hook()

    def ready(self) -> LoadedModel:
        if self.model is None:
            raise NotReady("model not loaded yet")
        return self.model

    def logits(self, m: LoadedModel, x: np.ndarray) -> np.ndarray:
        """Logits of a normalised float32 (N, 784) batch, timed for the metrics."""
        t0 = time.perf_counter()
        z = m.logits(x)
        self.metrics.inferred(m.runtime, x.shape[0], time.perf_counter() - t0)
        return z

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits of validated rows: their place in the next batch (or one direct call, batching off).
        While the model warms up (in a thread), they wait for it: the model is never called from two
        threads at once. Every protocol's model calls come through here."""
        if self.warming is not None:
            await self.warming.wait()
        return await self.batcher.infer(x)

    def normalize(self, m: LoadedModel, pixels: np.ndarray) -> np.ndarray:
        """0..255 pixels -> the model's input, with the mean and std the model was trained with (read from
        its manifest once per model, not per request)."""
        norm = self._norm
        if norm is None or norm[0] is not m:
            norm = self._norm = (m, manifest_normalization(m.manifest))
        return normalize_pixels(pixels, **norm[1])

    # -- our JSON ------------------------------------------------------------------------------

    async def predict_pixels(self, values: Any) -> dict:
        """One image of 784 raw pixel values -> its prediction."""
        t0 = time.perf_counter()
        m = self.ready()
        x = self.normalize(m, pixels_to_array(values))  # validated here: a bad request never joins a batch
        return single_answer(await self.predict_rows(m, x, t0))

    async def predict_pixel_batch(self, rows: Any) -> dict:
        """A JSON list of images -> their predictions."""
        m = self.ready()
        t0 = time.perf_counter()
        if isinstance(rows, list) and len(rows) > self.max_batch:
            raise InputError(f"at most {self.max_batch} images per batch, got {len(rows)}")
        out = await self.predict_rows(m, self.normalize(m, pixels_to_array(rows, batch=True)), t0)
        out["count"] = len(out["predictions"])
        return out

    async def predict_rows(self, m: LoadedModel, x: np.ndarray, t0: float) -> dict:
        """Predictions for validated, normalised rows (a request larger than the batch cap runs alone)."""
        return self.answer(m, softmax(await self.infer(x)), t0)

    @staticmethod
    def answer(m: LoadedModel, probs: np.ndarray, t0: float) -> dict:
        """Our JSON answer for rows of probabilities: ``predictions``, ``runtime``, ``latency_ms`` since ``t0``."""
        return {"predictions": [result(p) for p in probs], "runtime": m.runtime,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}

    # -- uploaded images -----------------------------------------------------------------------

    async def predict_images(self, files: list[tuple[str, bytes]], decoders: anyio.CapacityLimiter) -> dict:
        """Uploaded images (name, bytes) -> their predictions.

        Headers are read in a worker thread (never on the event loop), all of them before any pixel is
        decoded, so an over-limit or unreadable image is answered at once. Then each image is decoded in
        its own turn for one of the ``decoders``: turns are granted first come, first served, one image
        at a time, so a small upload waits for a few images of a large batch, never for the whole batch.
        """
        m = self.ready()
        t0 = time.perf_counter()
        await anyio.to_thread.run_sync(self.check_images, files)
        norm = manifest_normalization(m.manifest)
        rows = [await anyio.to_thread.run_sync(self._decode, i, len(files), name, blob, norm, limiter=decoders)
                for i, (name, blob) in enumerate(files)]
        return await self.predict_rows(m, np.concatenate(rows), t0)

    def check_images(self, files: list[tuple[str, bytes]]) -> None:
        """Refuse at once what cannot be decoded cheaply: read each image's header, check its pixel count."""
        for i, (name, blob) in enumerate(files):
            try:
                check_image_header(blob, max_pixels=self.max_image_pixels, name=name)
            except InputError as exc:
                raise type(exc)(f"image {i} ({exc})" if len(files) > 1 else str(exc)) from None

    def _decode(self, i: int, count: int, name: str, blob: bytes, norm: dict) -> np.ndarray:
        """One uploaded image -> its normalised row (slow: run it in a worker thread)."""
        try:
            return preprocess_image(blob, max_pixels=self.max_image_pixels, name=name, **norm)
        except InputError as exc:
            raise InputError(f"image {i} ({exc})" if count > 1 else str(exc)) from None

    # -- what is served ------------------------------------------------------------------------

    def unready(self) -> str | None:
        """Why the server is not ready (loading, warming up, draining), or None when it is."""
        if self.draining:
            return "draining"
        if self.model is None:
            return "loading"
        if not self.warm:
            return self.warm_error or "warming up"
        return None

    def health(self) -> dict | None:
        """The health answer, or None while the model loads or warms up, or once a drain has begun (not ready)."""
        m = self.model
        if m is None or self.unready() is not None:
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


def _time_calls(m: LoadedModel, x: np.ndarray, sizes: tuple[int, ...], calls: int) -> dict[int, float]:
    """Median seconds of ``calls`` model calls at each batch size (the first rows of ``x``)."""
    out = {}
    for n in sizes:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            m.logits(x[:n])
            times.append(time.perf_counter() - t0)
        out[n] = float(np.median(times))
    return out


def single_answer(answer: dict) -> dict:
    """A one-image answer: the image's prediction with ``runtime`` and ``latency_ms`` beside it."""
    return {**answer.pop("predictions")[0], **answer}


def result(probs: np.ndarray) -> dict:
    """One probability row -> our JSON answer: the digit, its confidence and the ten probabilities."""
    digit = int(probs.argmax())
    return {"digit": digit, "confidence": round(float(probs[digit]), 6),
            "probabilities": [round(p, 6) for p in probs.tolist()]}


__all__ = ["BatcherClosed", "NotReady", "Service", "bound_image_metadata", "result", "single_answer"]
