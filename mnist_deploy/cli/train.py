"""data, train and evaluate."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .common import (
    cache_dir_option,
    cli,
    data_dir_option,
    no_download_option,
    positive,
    stderr_console,
    thread_count,
)

MODEL_NAMES = ("mlp", "cnn")  # mirrors models.MODELS; kept here so --help never imports torch
RDZV_TIMEOUT = 300.0  # mirrors train.distributed.DEFAULT_RDZV_TIMEOUT, for the same reason


@cli.command("data")
@data_dir_option
@no_download_option
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG grid of sample test digits with their labels.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def data_cmd(data_dir, no_download, preview, as_json) -> None:
    """Check the MNIST files (MD5 and IDX header) and print counts per split and class."""
    from ..data.mnist import summary, write_preview

    info = summary(data_dir, allow_download=not no_download)
    if preview:
        write_preview(preview, data_dir, allow_download=not no_download)
        info["preview"] = str(preview)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"data folder: {info['data_dir']}")
    for name, f in info["files"].items():
        click.echo(f"  {name:<26} md5 {f['md5']}  OK")
    for split, s in info["splits"].items():
        counts = " ".join(f"{c}:{n}" for c, n in s["per_class"].items())
        click.echo(f"{split:<5} {s['count']:>6} images   per class {counts}")
    if preview:
        click.echo(f"preview written to {preview}")


class _RichReporter:
    """A progress bar per epoch with loss and running accuracy."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"), TimeElapsedColumn(),
            console=stderr_console(),
        )
        self.task = None

    def start_epoch(self, epoch, epochs, steps):
        if self.task is None:
            self.progress.start()
        self.task = self.progress.add_task("", total=steps, epoch=f"{epoch}/{epochs}", loss=0.0, acc=0.0)

    def update(self, steps_done, loss, accuracy):
        self.progress.update(self.task, completed=steps_done, loss=loss, acc=accuracy)

    def end_epoch(self, record):
        self.progress.console.print(
            f"  epoch {record['epoch']}: test loss {record['test_loss']:.4f}, "
            f"test accuracy {100 * record['test_accuracy']:.2f}%"
        )

    def close(self):
        self.progress.stop()


@cli.command("train")
@click.option("--model", type=click.Choice(MODEL_NAMES), default="mlp", show_default=True,
              help="mlp: a 784-128-64-10 ReLU network; cnn: conv + batch norm + dropout.")
@click.option("--epochs", type=int, default=5, show_default=True, callback=positive)
@click.option("--batch-size", type=int, default=64, show_default=True, callback=positive,
              help="Global batch; with N processes each takes batch-size / N per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate (base rate).")
@click.option("--schedule", type=click.Choice(["onecycle", "constant"]), default="onecycle", show_default=True,
              help="onecycle: warm up to 3x --lr, then anneal; constant: --lr throughout.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Same seed (and process count), same CPU run, bitwise.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--subset", type=int, default=None, callback=positive,
              help="Train on the first N training images only (quick runs).")
@click.option("--threads", type=int, default=None, callback=thread_count,
              help="PyTorch intra-op threads (per process with --nproc-per-node; default 1 there).")
@click.option("--step", type=click.Choice(["auto", "fused", "autograd"]), default="auto", show_default=True,
              help="fused: the MLP's hand-fused forward, backward and Adam (one process); autograd: "
                   "the generic step; auto: fused where it applies.")
@click.option("--plots", is_flag=True, help="Also draw training_curves.png and confusion_matrix.png.")
@click.option("--nproc-per-node", type=int, default=None, callback=positive,
              help="Launch N training processes with torchrun (torch.distributed, DDP; gloo on CPU, NCCL on CUDA).")
@click.option("--nnodes", type=int, default=1, show_default=True, callback=positive,
              help="With --nproc-per-node: machines in the job.")
@click.option("--node-rank", type=int, default=0, show_default=True, help="With --nnodes: this machine's rank.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="With --nnodes: where node 0 listens (every node passes the same; IPv6 as [ADDR]:PORT).")
@click.option("--rdzv-timeout", type=click.FloatRange(0, 86400, min_open=True), default=RDZV_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="With --nnodes: how long to wait for every node to join before giving up.")
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True, help="Output folder for the state_dict, metrics, manifest and plots.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_cmd(model, epochs, batch_size, lr, schedule, seed, device, subset, threads, step, plots, nproc_per_node,
              nnodes, node_rank, rdzv_endpoint, rdzv_timeout, data_dir, cache_dir, no_download, out, quiet) -> None:
    """Train a model with Adam + CrossEntropyLoss, evaluate on the 10,000 test images, write artifacts.

    The state_dict, metrics, manifest (and plots) replace the previous ones in --out as one unit.
    Under torchrun (`torchrun --nproc-per-node N -m mnist_deploy train ...`, or --nproc-per-node N
    here) every process trains its shard and rank 0 evaluates and writes.
    """
    from ..train.loop import TrainConfig, train

    config = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                         seed=seed, device=device, subset=subset, threads=threads, step=step)
    if not nproc_per_node and (nnodes > 1 or node_rank or rdzv_endpoint):
        raise click.UsageError("--nnodes, --node-rank and --rdzv-endpoint go with --nproc-per-node")
    if nproc_per_node:
        from ..train.distributed import check_job, launch_train, per_rank_batch

        # The node rank and the endpoint first (exit 2, one line): they hung or gave tracebacks in torchrun.
        check_job(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_timeout=rdzv_timeout)
        config.validate()
        per_rank_batch(config.batch_size, nproc_per_node * nnodes)  # refuse before starting any process
        if config.step == "fused":  # under torchrun, even of one process, the step is DDP's
            from ..train.step import fused_supported

            raise click.UsageError(fused_supported(None, nproc_per_node * nnodes, distributed=True) or "")
        args = _train_args(config, plots=plots, data_dir=data_dir, cache_dir=cache_dir, no_download=no_download,
                           out=out, quiet=quiet)
        launch_train(args, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                     rdzv_endpoint=rdzv_endpoint, rdzv_timeout=rdzv_timeout, threads=threads, out=str(out),
                     announce=lambda line: click.echo(line, err=True))
        return
    reporter = None if quiet or not sys.stderr.isatty() and not os.environ.get("MNIST_DEPLOY_PROGRESS") else _RichReporter()
    try:
        metrics = train(config, data_dir=data_dir, cache_dir=cache_dir, out=out,
                        allow_download=not no_download, reporter=reporter, plots=plots)
    finally:
        if reporter is not None:
            reporter.close()
    if metrics is None:  # a torchrun worker other than rank 0: rank 0 reports
        return
    _print_metrics(metrics)
    procs = f" x {metrics['world_size']} processes ({metrics['backend']})" if metrics.get("backend") else ""
    click.echo(f"trained in {metrics['train_seconds']:.1f} s on {metrics['device']}{procs}; artifacts in {out}/")


def _train_args(config, *, plots, data_dir, cache_dir, no_download, out, quiet) -> list[str]:
    """The worker command line that reproduces ``config`` (what --nproc-per-node hands to torchrun)."""
    args = ["--model", config.model, "--epochs", str(config.epochs), "--batch-size", str(config.batch_size),
            "--lr", repr(config.lr), "--schedule", config.schedule, "--seed", str(config.seed),
            "--device", config.device, "--step", config.step, "--out", str(out)]
    for flag, value in (("--subset", config.subset), ("--threads", config.threads), ("--data-dir", data_dir),
                        ("--cache-dir", cache_dir)):
        if value is not None:
            args += [flag, str(value)]
    args += [flag for flag, on in (("--plots", plots), ("--no-download", no_download), ("--quiet", quiet)) if on]
    return args


def _print_metrics(m: dict) -> None:
    click.echo(
        f"{m.get('model', '')}: accuracy {100 * m['accuracy']:.2f}%  precision {100 * m['precision_macro']:.2f}%  "
        f"recall {100 * m['recall_macro']:.2f}%  F1 {100 * m['f1_macro']:.2f}% (macro, 10,000 test images)"
    )


@cli.command("evaluate")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A state_dict .pth; its folder's manifest.json says which model to build. "
              "Default: ARTIFACTS/mnist_model_state_dict.pth.")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True)
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--json", "as_json", is_flag=True, help="Print all metrics as JSON.")
def evaluate_cmd(checkpoint, artifacts, data_dir, cache_dir, no_download, as_json) -> None:
    """Reload a trained state_dict and recompute the test metrics."""
    from ..train.loop import evaluate

    metrics = evaluate(checkpoint, artifacts=artifacts, data_dir=data_dir, cache_dir=cache_dir,
                       allow_download=not no_download)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    _print_metrics(metrics)
    click.echo("class  precision  recall     F1  support")
    for c, v in metrics["per_class"].items():
        click.echo(f"{c:>5}  {100 * v['precision']:8.2f}%  {100 * v['recall']:6.2f}%  {100 * v['f1']:5.2f}%  {v['support']:>7}")


