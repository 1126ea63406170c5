"""Training and evaluation: Adam + CrossEntropyLoss on preprocessed tensors held in memory.

Rather than a per-sample ``Dataset`` through a ``DataLoader``, the whole normalised set is one tensor
and a batch is one index into it, which is where most of the speed comes from.
Under torchrun each rank takes its shard of that tensor (``distributed.py``).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import __version__
from ..artifacts.commit import replace_set
from ..artifacts.manifest import MANIFEST_NAME, STATE_DICT_NAME, artifact_entry, load_manifest
from ..data.mnist import MEAN, STD, load_splits
from ..devices import resolve_device
from ..errors import InputError
from ..faults import fault_point
from ..formats import model_from_state_dict, packages
from ..metrics import classification_metrics
from ..models import MODELS, build_model, get_spec, model_hparams
from . import distributed
from .optim import OneCycle
from .step import STEPS, make_step

SCHEDULES = ("onecycle", "constant")


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in the manifest."""

    model: str = "mlp"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "onecycle"  # onecycle: warm up to peak_lr_factor * lr, then anneal; constant: lr throughout
    peak_lr_factor: float = 3.0
    seed: int = 0
    device: str = "auto"
    subset: int | None = None  # train on the first N training images (quick runs, tests)
    threads: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    step: str = "auto"  # auto: the fused MLP step where it applies (one process, mlp), else autograd

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
        if self.step not in STEPS:
            raise InputError(f"unknown step '{self.step}'; choose one of {', '.join(STEPS)}")
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


class _Tally:
    """The epoch's running loss and accuracy, from the logits the steps wrote (rows seen so far)."""

    def __init__(self, device) -> None:
        import torch

        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0

    def add(self, logits, labels, upto: int) -> None:
        import torch

        z, y = logits[self.seen : upto], labels[self.seen : upto]
        with torch.no_grad():
            self.loss_sum += torch.nn.functional.cross_entropy(z, y, reduction="sum").double()
            self.correct += (z.argmax(1) == y).sum()
        self.seen = upto

    def means(self) -> tuple[float, float]:
        return self.loss_sum.item() / self.seen, self.correct.item() / self.seen


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
          reporter: Reporter | None = None, plots: bool = False) -> dict | None:
    """Train, evaluate on the 10,000 test images and write the artifacts into ``out``.

    Nothing in ``out`` changes until training has finished, and then the state_dict, metrics, plots
    (``plots=True``) and manifest replace the previous ones as one unit: an interrupted run leaves the
    previous set or the new one, whole. Under torchrun every rank trains its shard and rank 0
    evaluates and writes; the other ranks return None. Returns the metrics (with ``history`` and
    ``train_seconds``). torch's global thread count is left as it was found.
    """
    import torch

    config.validate()
    threads_before = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        rank, device = distributed.setup(config.device)
        try:
            return _train(config, rank, device, data_dir=data_dir, cache_dir=cache_dir, out=out,
                          allow_download=allow_download, reporter=reporter, plots=plots)
        finally:
            distributed.shutdown(rank)
    finally:
        torch.set_num_threads(threads_before)


@dataclass
class _Run:
    """One run's moving parts, made by :func:`_prepare` and driven by :func:`_epochs`."""

    model: Any  # the bare model (what is saved)
    net: Any  # what is trained: the model, or its DDP wrapper
    stepper: Any
    sched: Any  # OneCycle, or None for a constant rate
    train_x: Any
    train_y: Any
    steps: int  # per epoch (every rank the same, as DistributedSampler pads)
    batch: int  # per rank


def _train(config: TrainConfig, rank: distributed.Rank, device, *, data_dir, cache_dir, out, allow_download,
           reporter, plots) -> dict | None:
    reporter = (reporter if rank.is_main else None) or _Silent()
    splits, source_md5 = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    run, hparams = _prepare(config, rank, device, splits)
    t0 = time.perf_counter()
    history, test_pred = _epochs(config, rank, device, run, splits["test"], reporter)
    run.stepper.finish()
    step_name = run.stepper.name
    train_seconds = time.perf_counter() - t0
    model, n_train = run.model, run.train_x.shape[0]
    del run  # the DDP wrapper (and anything that holds it) must go before the process group

    ok, error = True, None
    metrics = None
    if rank.is_main:
        try:
            metrics = _final_metrics(model, splits["test"], test_pred, device)
            metrics.update(train_seconds=train_seconds, history=history, model=config.model, device=str(device),
                           world_size=rank.world_size, backend=rank.backend, step=step_name)
            _write_training_artifacts(Path(out), model.cpu().eval(), config, hparams, metrics, source_md5, n_train,
                                      rank, plots)
        except Exception as exc:  # noqa: BLE001 - told to the other ranks, then raised
            ok, error = False, exc
    if rank.distributed and not distributed.agree(ok, device) and error is None:
        raise distributed.DistributedError(f"rank {rank.rank}: rank 0 could not write the artifacts; "
                                           "see its error")
    if error is not None:
        raise error
    return metrics


def _prepare(config: TrainConfig, rank: distributed.Rank, device, splits) -> tuple[_Run, dict]:
    """The training data (a subset when asked) on the device, the model, its stepper and schedule."""
    import torch

    batch = distributed.per_rank_batch(config.batch_size, rank.world_size)
    train_x, train_y = splits["train"].images, splits["train"].labels
    if config.subset:
        train_x, train_y = train_x[: config.subset], train_y[: config.subset]
    n = train_x.shape[0]
    torch.manual_seed(config.seed)
    hparams = model_hparams(config.model, config.hparams)
    model = build_model(config.model, hparams).to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)
    per_rank = math.ceil(n / rank.world_size)  # DistributedSampler pads every rank to this many
    steps = math.ceil(per_rank / batch)
    net = distributed.wrap(model, rank, device) if rank.distributed else model
    stepper = make_step(config.step, net, model, config.lr, device, rank.world_size, rank.distributed)
    sched = None
    if config.schedule == "onecycle":
        sched = OneCycle(stepper.opt, max_lr=config.lr * config.peak_lr_factor, total_steps=steps * config.epochs,
                         pct_start=0.15)
    return _Run(model, net, stepper, sched, train_x, train_y, steps, batch), hparams


def _epochs(config: TrainConfig, rank: distributed.Rank, device, run: _Run, test, reporter) -> tuple[list, Any]:
    """Train ``config.epochs`` epochs; rank 0 evaluates on the test set after each. Returns the history
    and the last test predictions (rank 0; None elsewhere)."""
    import torch

    n, steps, batch = run.train_x.shape[0], run.steps, run.batch
    test_y = test.labels.numpy()
    gen = torch.Generator().manual_seed(config.seed)
    history, test_pred = [], None
    for epoch in range(1, config.epochs + 1):
        reporter.start_epoch(epoch, config.epochs, steps)
        if rank.distributed:
            order = distributed.shard(n, epoch=epoch - 1, seed=config.seed, rank=rank).to(device)
        else:
            order = torch.randperm(n, generator=gen).to(device)
        run.stepper.begin_epoch(run.train_x, run.train_y, order)
        rows = order.shape[0]
        tally = _Tally(device)
        for step in range(steps):
            e = min((step + 1) * batch, rows)
            run.stepper.step(step * batch, e)
            if run.sched is not None:
                run.sched.step()
            if step == 0:
                fault_point(f"train:rank{rank.rank}:step")
            if (step + 1) % 50 == 0 or step + 1 == steps:
                tally.add(run.stepper.data.logits, run.stepper.data.y, e)  # .item() syncs, so only every 50 steps
                reporter.update(step + 1, *tally.means())
        totals = [tally.loss_sum.item(), float(tally.correct.item()), float(tally.seen)]
        if rank.distributed:
            totals = distributed.all_sum(totals, device)
        record = {"epoch": epoch, "train_loss": totals[0] / totals[2], "train_accuracy": totals[1] / totals[2],
                  "lr": run.stepper.opt.lr}
        if rank.is_main:  # the full, unpadded test set, on rank 0 only
            test_loss, test_pred = _evaluate_split(run.model, test, device)
            record.update(test_loss=test_loss, test_accuracy=float((test_pred == test_y).mean()))
            reporter.end_epoch(record)
        history.append(record)
    return history, test_pred


def _final_metrics(model, test, test_pred, device) -> dict:
    """The test metrics of the trained model, predicted on the CPU (again, when it trained elsewhere)."""
    import torch

    model = model.cpu().eval()
    if device.type != "cpu":
        _, test_pred = _evaluate_split(model, test, torch.device("cpu"))
    return classification_metrics(test.labels.numpy(), test_pred)


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "mnist_deploy": __version__}
    for pkg in ("torch", *packages()):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _write_training_artifacts(out: Path, model, config: TrainConfig, hparams: dict, metrics: dict,
                              source_md5: dict, n_train: int, rank: distributed.Rank, plots: bool) -> None:
    import torch

    with replace_set(out, manifest_name=MANIFEST_NAME) as stage:
        buf = io.BytesIO()  # torch's zip writer turns a failed write into a RuntimeError; plain writes give OSError
        torch.save(model.state_dict(), buf)
        (stage / STATE_DICT_NAME).write_bytes(buf.getvalue())
        fault_point("train:after-state-dict")
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        fault_point("train:after-metrics")
        entries = {
            "state_dict": artifact_entry(stage / STATE_DICT_NAME, format="state_dict"),
            "metrics": artifact_entry(stage / "metrics.json", format="json"),
        }
        if plots:
            from ..plots import confusion_matrix_plot, training_curves

            training_curves(metrics["history"], stage / "training_curves.png")
            confusion_matrix_plot(metrics["confusion_matrix"], stage / "confusion_matrix.png",
                                  f"{config.model}: test accuracy {100 * metrics['accuracy']:.2f}%")
            entries["training_curves"] = artifact_entry(stage / "training_curves.png", format="png")
            entries["confusion_matrix"] = artifact_entry(stage / "confusion_matrix.png", format="png")
            fault_point("train:after-plots")
        spec = get_spec(config.model)
        # A new state_dict invalidates every export made from the previous one, so the manifest starts afresh.
        manifest = {
            "toolkit_version": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "model": {"name": config.model, "hparams": hparams, "input_shape": list(spec.input_shape)},
            "preprocessing": {"scale": 1 / 255, "mean": MEAN, "std": STD, "layout": _layout(spec.input_shape)},
            "training": {**asdict(config), "n_train": n_train},
            "distributed": {"world_size": rank.world_size, "backend": rank.backend,
                            "per_rank_batch": config.batch_size // rank.world_size},
            "seed": config.seed,
            "data": {"source_md5": source_md5},
            "versions": library_versions(),
            "metrics": {k: metrics[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro",
                                                "train_seconds")},
            "artifacts": entries,
        }
        fault_point("train:before-manifest")
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


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
    """Reload a state_dict and recompute the test metrics."""
    model, manifest = load_trained_model(checkpoint, artifacts=artifacts)
    dev = resolve_device(device)
    splits, _ = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    _, pred = _evaluate_split(model.to(dev), splits["test"], dev)
    metrics = classification_metrics(splits["test"].labels.numpy(), pred)
    metrics["model"] = manifest["model"]["name"]
    return metrics
