"""Training and evaluation: Adam + CrossEntropyLoss on preprocessed tensors held in memory.

The origin project fed a per-sample ``Dataset`` through a ``DataLoader``; here the whole normalised
set is one tensor and a batch is one index into it, which is where most of the speed comes from.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .artifacts import (
    STATE_DICT_NAME,
    artifact_entry,
    atomic_path,
    atomic_torch_save,
    atomic_write_json,
    load_manifest,
    save_manifest,
)
from .data import MEAN, STD, load_splits
from .devices import resolve_device
from .errors import InputError
from .formats import model_from_state_dict
from .metrics import classification_metrics
from .models import MODELS, build_model, get_spec, model_hparams

SCHEDULES = ("onecycle", "constant")


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in the manifest."""

    model: str = "mlp"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "onecycle"  # onecycle: warm up to peak_lr_factor * lr, then anneal; constant: the origin's
    peak_lr_factor: float = 3.0
    seed: int = 0
    device: str = "auto"
    subset: int | None = None  # train on the first N training images (quick runs, tests)
    threads: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise InputError(f"unknown model '{self.model}'; choose one of {', '.join(MODELS)}")
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if self.subset is not None and self.subset < 1:
            raise InputError(f"--subset must be at least 1, got {self.subset}")


class Reporter(Protocol):
    """What training tells its caller as it goes (the CLI draws a progress bar from it)."""

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None: ...
    def update(self, steps_done: int, loss: float, accuracy: float) -> None: ...
    def end_epoch(self, record: dict) -> None: ...


class _Silent:
    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def update(self, steps_done: int, loss: float, accuracy: float) -> None:
        pass

    def end_epoch(self, record: dict) -> None:
        pass


def predict_logits(model, images, device, batch: int = 2000):
    """Logits for ``images`` (a CPU tensor), in eval mode, without gradients, as a CPU tensor."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            outs.append(model(images[i : i + batch].to(device, non_blocking=True)).float().cpu())
    return torch.cat(outs)


def _evaluate_split(model, split, device) -> tuple[float, np.ndarray]:
    import torch

    logits = predict_logits(model, split.images, device)
    loss = float(torch.nn.functional.cross_entropy(logits, split.labels))
    return loss, logits.argmax(1).numpy()


def train(config: TrainConfig, *, data_dir=None, cache_dir=None, out="artifacts", allow_download: bool = True,
          reporter: Reporter | None = None) -> dict:
    """Train, evaluate on the 10,000 test images and write the artifacts into ``out``.

    Nothing in ``out`` is touched until training has finished: an interrupted run leaves the previous
    artifacts as they were. Returns the metrics (with ``history`` and ``train_seconds``).
    """
    import torch

    config.validate()
    reporter = reporter or _Silent()
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    splits, source_md5 = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    train_x, train_y = splits["train"].images, splits["train"].labels
    if config.subset:
        train_x, train_y = train_x[: config.subset], train_y[: config.subset]
    n = train_x.shape[0]

    torch.manual_seed(config.seed)
    hparams = model_hparams(config.model, config.hparams)
    model = build_model(config.model, hparams).to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)
    steps = math.ceil(n / config.batch_size)
    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)
    sched = None
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr * config.peak_lr_factor, total_steps=steps * config.epochs, pct_start=0.15
        )
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        reporter.start_epoch(epoch, config.epochs, steps)
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for step in range(steps):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            xb, yb = train_x[idx], train_y[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                loss_sum += loss.detach() * yb.shape[0]
                correct += (logits.argmax(1) == yb).sum()
            seen += yb.shape[0]
            if (step + 1) % 50 == 0 or step + 1 == steps:
                # .item() syncs with the device, so only every 50 steps.
                reporter.update(step + 1, loss_sum.item() / seen, correct.item() / seen)
        test_loss, test_pred = _evaluate_split(model, splits["test"], device)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen,
            "train_accuracy": correct.item() / seen,
            "test_loss": test_loss,
            "test_accuracy": float((test_pred == splits["test"].labels.numpy()).mean()),
            "lr": opt.param_groups[0]["lr"],
        }
        history.append(record)
        reporter.end_epoch(record)
    train_seconds = time.perf_counter() - t0

    model = model.cpu().eval()
    _, test_pred = _evaluate_split(model, splits["test"], torch.device("cpu"))
    metrics = classification_metrics(splits["test"].labels.numpy(), test_pred)
    metrics.update(train_seconds=train_seconds, history=history, model=config.model, device=str(device))
    _write_training_artifacts(Path(out), model, config, hparams, metrics, source_md5, n)
    return metrics


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "mnist_deploy": __version__}
    for pkg in ("torch", "numpy", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _write_training_artifacts(out: Path, model, config: TrainConfig, hparams: dict, metrics: dict,
                              source_md5: dict, n_train: int) -> None:
    from .plots import confusion_matrix_plot, training_curves

    out.mkdir(parents=True, exist_ok=True)
    sd_path = atomic_torch_save(model.state_dict(), out / STATE_DICT_NAME)
    metrics_path = atomic_write_json(out / "metrics.json", metrics)
    curves_path = out / "training_curves.png"
    with atomic_path(curves_path) as tmp:
        training_curves(metrics["history"], tmp)
    cm_path = out / "confusion_matrix.png"
    with atomic_path(cm_path) as tmp:
        confusion_matrix_plot(metrics["confusion_matrix"], tmp,
                              f"{config.model}: test accuracy {100 * metrics['accuracy']:.2f}%")
    spec = get_spec(config.model)
    # A new state_dict invalidates every export made from the previous one, so the manifest starts afresh.
    manifest = {
        "toolkit_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": config.model, "hparams": hparams, "input_shape": list(spec.input_shape)},
        "preprocessing": {"scale": 1 / 255, "mean": MEAN, "std": STD, "layout": _layout(spec.input_shape)},
        "training": {**asdict(config), "n_train": n_train},
        "seed": config.seed,
        "data": {"source_md5": source_md5},
        "versions": library_versions(),
        "metrics": {k: metrics[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro",
                                            "train_seconds")},
        "artifacts": {
            "state_dict": artifact_entry(sd_path, format="state_dict"),
            "metrics": artifact_entry(metrics_path, format="json"),
            "training_curves": artifact_entry(curves_path, format="png"),
            "confusion_matrix": artifact_entry(cm_path, format="png"),
        },
    }
    save_manifest(out, manifest)


def _layout(shape) -> str:
    return "N,784 float32 (row-major 28x28, normalised)" if tuple(shape) == (784,) else "N,1,28,28 float32 (normalised)"


def load_trained_model(checkpoint=None, *, artifacts="artifacts"):
    """Rebuild the model described by the manifest next to ``checkpoint`` and load its weights safely.

    Returns ``(model, manifest)``. The manifest says which model and hyperparameters to build.
    """
    checkpoint = Path(checkpoint) if checkpoint else Path(artifacts) / STATE_DICT_NAME
    manifest = load_manifest(checkpoint.parent)
    return model_from_state_dict(manifest, checkpoint), manifest


def evaluate(checkpoint=None, *, artifacts="artifacts", data_dir=None, cache_dir=None,
             allow_download: bool = True, device: str = "cpu") -> dict:
    """Reload a state_dict and recompute the test metrics (the origin's "reload and evaluate")."""
    model, manifest = load_trained_model(checkpoint, artifacts=artifacts)
    dev = resolve_device(device)
    splits, _ = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    _, pred = _evaluate_split(model.to(dev), splits["test"], dev)
    metrics = classification_metrics(splits["test"].labels.numpy(), pred)
    metrics["model"] = manifest["model"]["name"]
    return metrics
