"""What export and verify share: the trained model rebuilt from the manifest, the test set, the
PyTorch reference logits, the metadata written into every artifact, and the parity thresholds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..artifacts.files import sha256_file
from ..artifacts.manifest import load_manifest
from ..errors import CheckpointError, InputError
from ..formats import FP32_PARITY, REDUCED_PARITY, Format, ParitySpec, build_options, get_format

CLASS_LABELS = [str(i) for i in range(10)]


@dataclass
class ExportConfig:
    """Everything that decides an export run and its parity gate; saved with every artifact.

    The thresholds left ``None`` are each format's own (:class:`formats.ParitySpec`); ``atol``,
    ``rtol`` and ``min_agreement`` override them for formats judged on logits, the ``int8_*`` ones
    for formats judged on predictions (INT8, bf16). ``options`` holds format options by field name
    (``opset``, ``torchscript_method``...); each format takes the ones its options dataclass has.
    ``formats`` empty (or holding ``all``) is every exportable format, and a format that cannot run
    here is then skipped; a format named explicitly that cannot run here is an error.
    ``parity_images`` judges parity on the first N test images instead of all 10,000 (quick runs and
    tests where the full set is not the point); ``parity=False`` skips the gate altogether.
    """

    formats: tuple[str, ...] = ()
    atol: float | None = None
    rtol: float | None = None
    min_agreement: float | None = None
    int8_min_agreement: float | None = None
    int8_max_accuracy_drop: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    parity: bool = True
    parity_images: int | None = None

    @classmethod
    def from_arguments(cls, formats=None, **values: Any) -> ExportConfig:
        """A config from keyword arguments as the CLI (and callers from before the config) pass them:
        the config's own fields by name, every other keyword a format option (None: its default)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"formats", "options"}
        fields_ = {k: values.pop(k) for k in list(values) if k in own}
        options = {k: v for k, v in values.items() if v is not None}
        return cls(formats=tuple(dict.fromkeys(formats or ())), options=options, **fields_)

    @property
    def explicit(self) -> bool:
        """Whether formats were named (an unavailable one is then an error, not a skipped row)."""
        return bool(self.formats) and "all" not in self.formats

    def selected(self) -> tuple[str, ...]:
        """The formats this run exports, in order: the named ones, or every exportable one."""
        from ..formats import exportable

        return self.formats if self.explicit else exportable()

    def validate(self) -> None:
        """Raise :class:`InputError` (exit 2) for anything wrong, before anything is written."""
        from ..formats import option_types

        for name in self.selected():
            get_format(name)
        if self.parity_images is not None and (isinstance(self.parity_images, bool)
                                               or not isinstance(self.parity_images, int) or self.parity_images < 1):
            raise InputError(f"--parity-images must be a whole number of images >= 1, got {self.parity_images!r}")
        known = option_types()
        unknown = [k for k in self.options if k not in known]
        if unknown:
            raise InputError(f"unknown export option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for label, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise InputError(f"{label} must be a finite number >= 0, got {value}")
        for label, value in (("--min-agreement", self.min_agreement),
                             ("--int8-min-agreement", self.int8_min_agreement),
                             ("--int8-max-accuracy-drop", self.int8_max_accuracy_drop)):
            if value is not None and not (0.0 <= value <= 1.0):
                raise InputError(f"{label} is a fraction between 0 and 1, got {value}")
        for name in self.selected():
            build_options(get_format(name), self.options)

    def spec(self, fmt: Format) -> ParitySpec:
        base = fmt.parity
        if base.kind == "predictions":
            return ParitySpec("predictions", min_agreement=_pick(self.int8_min_agreement, base.min_agreement),
                              max_accuracy_drop=_pick(self.int8_max_accuracy_drop, base.max_accuracy_drop))
        return ParitySpec("logits", atol=_pick(self.atol, base.atol), rtol=_pick(self.rtol, base.rtol),
                          min_agreement=_pick(self.min_agreement, base.min_agreement))

    def criteria(self, fmt: Format) -> dict:
        return self.spec(fmt).criteria()

    def format_options(self, fmt: Format):
        return build_options(fmt, self.options)


def _pick(value, default):
    return default if value is None else value


DEFAULT_THRESHOLDS = {"atol": FP32_PARITY.atol, "rtol": FP32_PARITY.rtol, "min_agreement": FP32_PARITY.min_agreement,
                      "int8_min_agreement": REDUCED_PARITY.min_agreement,
                      "int8_max_accuracy_drop": REDUCED_PARITY.max_accuracy_drop}


@dataclass
class Source:
    model: Any
    manifest: dict
    checkpoint: Path
    sha256: str


def load_source(checkpoint: Path) -> Source:
    from ..formats import model_from_state_dict

    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file; run `mnist-deploy train` first")
    manifest = load_manifest(checkpoint.parent)
    name = manifest["model"]["name"]
    model = model_from_state_dict(manifest, checkpoint, f"{checkpoint} (manifest says model '{name}')")
    return Source(model, manifest, checkpoint, sha256_file(checkpoint))


@dataclass
class EvalData:
    images: np.ndarray  # float32 (N, *input_shape)
    labels: np.ndarray
    train_images: Any = None  # the training images, flat (for INT8 calibration and tuning)
    shape: tuple[int, ...] = (784,)
    train_labels: Any = None
    trained_on: int | None = None  # the model saw the first N training images only (train --subset)

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """(calibration pool, tuning pool): disjoint training indices, fixed by a seed. The tuning pool is
        taken from images the model did not train on when it trained on a subset."""
        n = len(self.train_images)
        order = np.random.default_rng(0).permutation(n)
        size = min(TUNING_POOL, n // 2)  # a small training set keeps half of it for calibration
        unseen = order[order >= self.trained_on] if self.trained_on and self.trained_on < n else order[:0]
        tuning = unseen[:size] if len(unseen) >= size // 2 else order[n - size :]
        return np.setdiff1d(order, tuning, assume_unique=True), tuning

    def head(self, n: int | None) -> EvalData:
        """The first ``n`` test images and labels (all of them for None); the calibration images stay."""
        if n is None or n >= len(self.labels):
            return self
        return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])

    def calibration(self, n: int) -> np.ndarray:
        """``n`` training images, the same ones for the same ``n`` (a fixed seed), never tuning images."""
        pool, _ = self._split()
        idx = np.random.default_rng(0).choice(pool, size=min(n, len(pool)), replace=False)
        return np.ascontiguousarray(self.train_images[np.sort(idx)].reshape(-1, *self.shape), dtype=np.float32)

    def tuning_indices(self, n: int) -> np.ndarray:
        """Indices into the *training* split of the held-out images an exporter may tune on."""
        _, pool = self._split()
        return np.sort(pool[: min(n, len(pool))])

    def tuning(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` held-out training images and their labels: outside every calibration set, never test images."""
        idx = self.tuning_indices(n)
        images = np.ascontiguousarray(self.train_images[idx].reshape(-1, *self.shape), dtype=np.float32)
        return images, np.asarray(self.train_labels[idx])


TUNING_POOL = 10_000


def load_eval_data(manifest: dict, data_dir, cache_dir, allow_download: bool) -> EvalData:
    from ..data.mnist import load_splits

    splits, _ = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    shape = tuple(manifest["model"].get("input_shape") or (784,))
    test = splits["test"]
    images = test.images.numpy().reshape(len(test), *shape).astype(np.float32, copy=False)
    subset = (manifest.get("training") or {}).get("subset")
    return EvalData(np.ascontiguousarray(images), test.labels.numpy(), splits["train"].images.numpy(), shape,
                    splits["train"].labels.numpy(), int(subset) if subset else None)


def reference_logits(model, images: np.ndarray) -> np.ndarray:
    from ..formats import load_eager

    return load_eager(model)(images)


def artifact_metadata(manifest: dict, source_sha256: str) -> dict[str, str]:
    """What a consumer needs to feed the model (ONNX metadata_props; a JSON file in .pt/.pt2; OpenVINO rt_info)."""
    pre = manifest.get("preprocessing", {})
    model = manifest["model"]
    return {
        "model_name": str(model["name"]),
        "model_hparams": json.dumps(model.get("hparams", {}), sort_keys=True),
        "input_name": "input",
        "output_name": "logits",
        "input_shape": json.dumps(["batch", *model.get("input_shape", [784])]),
        "input_layout": str(pre.get("layout", "")),
        "preprocessing": "x = (pixel / 255 - mean) / std",
        "preprocessing_scale": repr(float(pre.get("scale", 1 / 255))),
        "preprocessing_mean": repr(float(pre.get("mean", 0.1307))),
        "preprocessing_std": repr(float(pre.get("std", 0.3081))),
        "class_labels": json.dumps(CLASS_LABELS),
        "source_state_dict_sha256": source_sha256,
        "toolkit": "mnist-deploy",
        "toolkit_version": __version__,
    }


onnx_metadata = artifact_metadata  # the name it had when ONNX was the only format with metadata
