"""The command line: parses options, calls library functions with keyword arguments, prints results.

Expected failures (:class:`MnistDeployError`) become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .bench import DEVICE_CHOICES as BENCH_DEVICES
from .bench import BenchConfig
from .devices import DEVICE_CHOICES
from .errors import MnistDeployError
from .formats import (
    DEFAULT_RUNTIME,
    FORMATS,
    FP32_PARITY,
    REDUCED_PARITY,
    exportable,
    option_types,
    written_as,
)

MODEL_NAMES = ("mlp", "cnn")  # mirrors models.MODELS; kept here so --help never imports torch
FORMAT_NAMES = exportable()  # the registry's exportable formats
BENCH_DEFAULTS = BenchConfig()


class _Group(click.Group):
    """Turns the library's typed errors into one line on stderr, and Ctrl-C into exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MnistDeployError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; artifacts already written are unchanged", err=True)
            ctx.exit(130)
        except OSError as exc:  # a full disk, a read-only folder: one line, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            click.secho(f"error: {where}{exc.strerror or exc}", fg="red", err=True)
            ctx.exit(1)


def _format_options(command):
    """One --option per field of the registry's format option dataclasses: type, choices, default and
    --help all come from the dataclass (a field shared by several formats, like opset, appears once)."""
    for name, f in reversed(list(option_types().items())):
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices:
            kind = click.Choice(list(choices))
        elif isinstance(f.default, int):
            kind = int
        elif isinstance(f.default, float):
            kind = float
        else:
            kind = str
        command = click.option("--" + name.replace("_", "-"), name, type=kind, default=f.default, show_default=True,
                               help=f.metadata.get("help", ""))(command)
        del minimum  # checked by the library (InputError, exit 2), with the same message as from Python
    return command


def _positive(_ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}", param=param)
    return value


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder with the four MNIST IDX files (flat or DIR/MNIST/raw/). Default: $MNIST_DEPLOY_DATA, else ./data.",
)
cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the preprocessed tensors are cached. Default: $MNIST_DEPLOY_CACHE, else ~/.cache/mnist-deploy.",
)
no_download_option = click.option(
    "--no-download", is_flag=True, help="Never download MNIST; fail if the files are not in the data folder."
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnist-deploy")
def cli() -> None:
    """Train an MNIST digit classifier, export it with parity checks, benchmark and serve it."""


@cli.command("data")
@data_dir_option
@no_download_option
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG grid of sample test digits with their labels.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def data_cmd(data_dir, no_download, preview, as_json) -> None:
    """Check the MNIST files (MD5 and IDX header) and print counts per split and class."""
    from .data import summary, write_preview

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
            console=_stderr_console(),
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


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@cli.command("train")
@click.option("--model", type=click.Choice(MODEL_NAMES), default="mlp", show_default=True,
              help="mlp: the origin's 784-128-64-10 network; cnn: conv + batch norm + dropout.")
@click.option("--epochs", type=int, default=5, show_default=True, callback=_positive)
@click.option("--batch-size", type=int, default=64, show_default=True, callback=_positive,
              help="Global batch; with N processes each takes batch-size / N per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate (base rate).")
@click.option("--schedule", type=click.Choice(["onecycle", "constant"]), default="onecycle", show_default=True,
              help="onecycle: warm up to 3x --lr, then anneal; constant: the origin's fixed rate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Same seed (and process count), same CPU run, bitwise.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--subset", type=int, default=None, callback=_positive,
              help="Train on the first N training images only (quick runs).")
@click.option("--threads", type=int, default=None, callback=_positive,
              help="PyTorch intra-op threads (per process with --nproc-per-node; default 1 there).")
@click.option("--plots", is_flag=True, help="Also draw training_curves.png and confusion_matrix.png (about 1 s).")
@click.option("--nproc-per-node", type=int, default=None, callback=_positive,
              help="Launch N training processes with torchrun (torch.distributed, DDP; gloo on CPU, NCCL on CUDA).")
@click.option("--nnodes", type=int, default=1, show_default=True, callback=_positive,
              help="With --nproc-per-node: machines in the job.")
@click.option("--node-rank", type=int, default=0, show_default=True, help="With --nnodes: this machine's rank.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="With --nnodes: where node 0 listens (every node passes the same).")
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True, help="Output folder for the state_dict, metrics, manifest and plots.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_cmd(model, epochs, batch_size, lr, schedule, seed, device, subset, threads, plots, nproc_per_node,
              nnodes, node_rank, rdzv_endpoint, data_dir, cache_dir, no_download, out, quiet) -> None:
    """Train a model with Adam + CrossEntropyLoss, evaluate on the 10,000 test images, write artifacts.

    The state_dict, metrics, manifest (and plots) replace the previous ones in --out as one unit.
    Under torchrun (`torchrun --nproc-per-node N -m mnist_deploy train ...`, or --nproc-per-node N
    here) every process trains its shard and rank 0 evaluates and writes.
    """
    from .train import TrainConfig, train

    config = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                         seed=seed, device=device, subset=subset, threads=threads)
    if not nproc_per_node and (nnodes > 1 or node_rank or rdzv_endpoint):
        raise click.UsageError("--nnodes, --node-rank and --rdzv-endpoint go with --nproc-per-node")
    if nproc_per_node:
        from .distributed import launch_train, per_rank_batch

        config.validate()
        per_rank_batch(config.batch_size, nproc_per_node * nnodes)  # refuse before starting any process
        args = _train_args(config, plots=plots, data_dir=data_dir, cache_dir=cache_dir, no_download=no_download,
                           out=out, quiet=quiet)
        launch_train(args, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                     rdzv_endpoint=rdzv_endpoint, threads=threads, out=str(out))
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
            "--device", config.device, "--out", str(out)]
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
    from .train import evaluate

    metrics = evaluate(checkpoint, artifacts=artifacts, data_dir=data_dir, cache_dir=cache_dir,
                       allow_download=not no_download)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    _print_metrics(metrics)
    click.echo("class  precision  recall     F1  support")
    for c, v in metrics["per_class"].items():
        click.echo(f"{c:>5}  {100 * v['precision']:8.2f}%  {100 * v['recall']:6.2f}%  {100 * v['f1']:5.2f}%  {v['support']:>7}")


@cli.command("export")
@click.option("--format", "formats", type=click.Choice([*FORMAT_NAMES, "all"]), multiple=True,
              default=("all",), show_default=True,
              help="Format to export; repeat the option for several. all: every format that can run here "
              "(the others are listed as skipped). "
              + " ".join(f"{f.name}: {f.deprecated}." for f in FORMATS.values() if f.deprecated))
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The state_dict to export; the manifest.json next to it says which model to rebuild. "
              "Default: OUT/mnist_model_state_dict.pth.")
@click.option("--out", "--artifacts", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("artifacts"), show_default=True,
              help="Folder the artifacts, manifest.json and parity.json are written to.")
@_format_options
@click.option("--atol", type=float, default=None,
              help=f"Parity: largest allowed |logit - PyTorch logit| (plus --rtol x |PyTorch logit|). "
              f"Default: {FP32_PARITY.atol:g}.")
@click.option("--rtol", type=float, default=None, help=f"Parity: relative tolerance. Default: {FP32_PARITY.rtol:g}.")
@click.option("--min-agreement", type=float, default=None,
              help="Parity: smallest allowed fraction of images with the same predicted digit (fp32 formats). "
              f"Default: {FP32_PARITY.min_agreement:g}.")
@click.option("--int8-min-agreement", type=float, default=None,
              help="Reduced-precision formats (" + ", ".join(n for n, f in FORMATS.items() if f.parity.kind == "predictions")
              + f"): smallest allowed top-1 agreement with the fp32 model. Default: {REDUCED_PARITY.min_agreement:g}.")
@click.option("--int8-max-accuracy-drop", type=float, default=None,
              help="Reduced-precision formats: largest allowed accuracy drop, as a fraction (0.003 = 0.3 points). "
              f"Default: {REDUCED_PARITY.max_accuracy_drop:g}.")
@click.option("--no-parity", is_flag=True, help="Skip the parity gate (experiments only; verify still checks).")
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--markdown", is_flag=True, help="Print the parity table as Markdown.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def export_cmd(formats, checkpoint, out, atol, rtol, min_agreement, int8_min_agreement, int8_max_accuracy_drop,
               no_parity, data_dir, cache_dir, no_download, markdown, as_json, **options) -> None:
    """Export the trained model to deployable formats and prove each computes what PyTorch computes.

    Every artifact is run on all 10,000 test images at batch sizes 1 and 10,000 and compared with
    the PyTorch model: logits within --atol/--rtol and top-1 agreement for the fp32 formats,
    agreement and accuracy drop for reduced-precision ones (INT8, bf16). A format that fails is
    recorded in manifest.json as failed and its files removed; the exit code is then 1. An I/O
    error (a full disk) keeps the previous artifact. Results also go to parity.json.
    """
    from .export import export_artifacts
    from .parity import would_pass_hint

    def progress(name):
        if not as_json:
            click.echo(f"exporting {name} ...", err=True)

    report = export_artifacts(
        artifacts=out, checkpoint=checkpoint, formats=list(formats), atol=atol, rtol=rtol,
        min_agreement=min_agreement, int8_min_agreement=int8_min_agreement,
        int8_max_accuracy_drop=int8_max_accuracy_drop, parity=not no_parity, data_dir=data_dir,
        cache_dir=cache_dir, allow_download=not no_download, progress=progress, **options,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"{report.model} from {report.source_state_dict_sha256[:12]}...: parity on 10,000 test "
                   "images at batch sizes 1 and 10,000 against PyTorch eager")
        click.echo(report.table(markdown=markdown))
        reduced = [r.format for r in report.results if (r.parity or {}).get("criteria", {}).get("kind") == "predictions"]
        if reduced:
            c = next(r.parity["criteria"] for r in report.results if r.format == reduced[0])
            click.echo(f"{', '.join(reduced)}: judged on predictions, not logits: agreement >= "
                       f"{100 * c['min_agreement']:.2f}% and accuracy drop <= {100 * c['max_accuracy_drop']:.2f} points")
        for r in report.results:
            if r.status == "ok":
                click.echo(f"{out / r.file}  {r.size_bytes:,} bytes  {r.export_seconds:.2f} s")
            elif r.status == "skipped":
                click.echo(f"{r.format}: skipped: {r.error}")
        if report.parity_path:
            click.echo(f"parity report: {report.parity_path}; manifest: {out / 'manifest.json'}")
    for r in report.failures:
        if r.status == "error":
            click.secho(f"error: {r.format}: {r.error}", fg="red", err=True)
            continue
        hint = would_pass_hint((r.parity or {}).get("criteria", {}).get("kind", "logits"),
                               (r.parity or {}).get("would_pass_with"))
        hint = f" ({hint})" if hint else ""
        click.secho(f"error: {r.format}: {r.error}{hint}; recorded as failed in the manifest, file removed",
                    fg="red", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command("verify")
@click.option("--artifacts", "--out", "artifacts", type=click.Path(file_okay=False, path_type=Path),
              default=Path("artifacts"), show_default=True)
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_cmd(artifacts, data_dir, cache_dir, no_download, as_json) -> None:
    """Re-check every artifact in the manifest: sha256, loads in its runtime, parity still holds.

    Exit code 1 and one line per problem when anything does not check out.
    """
    from .export import verify_artifacts

    report = verify_artifacts(artifacts=artifacts, data_dir=data_dir, cache_dir=cache_dir,
                              allow_download=not no_download)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for item in report.items:
            status = "OK  " if item.ok else "FAIL"
            click.echo(f"{status} {item.key:<18} {item.path or '-':<30} {', '.join(item.checks) or '-'}")
    for problem in report.problems:
        click.secho(f"error: {problem}", fg="red", err=True)
    if not report.ok:
        sys.exit(1)
    if not as_json:
        n = sum(1 for i in report.items if i.parity)
        click.echo(f"all {len(report.items)} artifacts verified ({n} formats re-checked for parity)")


@cli.command("bench")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True, help="The artifacts folder (state_dict, exports, manifest.json).")
@click.option("--runtimes", default="all", show_default=True, metavar="LIST",
              help="Comma list of " + ", ".join(dict.fromkeys(f.runtime for f in FORMATS.values()))
              + " (or the format names " + ", ".join(n for n, f in FORMATS.items() if n != f.runtime) + "), or all.")
@click.option("--batch-sizes", default=",".join(map(str, BENCH_DEFAULTS.batch_sizes)), show_default=True,
              metavar="LIST", help="Comma list of positive batch sizes.")
@click.option("--device", type=click.Choice(list(BENCH_DEVICES)), default=BENCH_DEFAULTS.device, show_default=True,
              help="all: CPU, plus CUDA when there is a GPU (skipped rows say why when there is not).")
@click.option("--threads", type=int, default=None, callback=_positive,
              help="Intra-op threads for PyTorch and ONNX Runtime alike. Default: the usable cores (recorded).")
@click.option("--warmup", type=click.IntRange(min=0), default=BENCH_DEFAULTS.warmup, show_default=True,
              help="Untimed calls before each row's timed calls.")
@click.option("--min-time", type=click.FloatRange(min=0, min_open=True), default=BENCH_DEFAULTS.min_time,
              show_default=True,
              metavar="SECONDS", help="Time each row at least this long (and at least 20 calls); more is tighter p99.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where bench.json/.csv/.md/.png go. Default: ARTIFACTS/bench.")
@data_dir_option
@cache_dir_option
@no_download_option
@click.option("--json", "as_json", is_flag=True, help="Print the JSON to stdout instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@click.pass_context
def bench_cmd(ctx, artifacts, runtimes, batch_sizes, device, threads, warmup, min_time, out, data_dir, cache_dir,
              no_download, as_json, quiet) -> None:
    """Benchmark every runtime x device x batch size: latency percentiles, throughput, GFLOP/s against a
    measured matmul peak, cold start, size and test accuracy. Writes bench.json, .csv, .md and .png."""
    from .bench import run_bench
    from .bench_report import format_table, write_outputs

    def progress(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    result = run_bench(artifacts=artifacts, runtimes=runtimes, batch_sizes=batch_sizes, device=device,
                       threads=threads, warmup=warmup, min_time=min_time, data_dir=data_dir, cache_dir=cache_dir,
                       allow_download=not no_download, progress=progress)
    out = out or Path(artifacts) / "bench"
    try:
        paths = write_outputs(result, out)
    except OSError as exc:  # a full disk: one line naming the folder, the measurements are lost
        raise MnistDeployError(f"{out}: cannot write the bench results: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_table(result), nl=False)
        click.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out}/")
    statuses = [r["status"] for r in result["records"]]
    if "ok" not in statuses:
        click.secho("error: nothing was measured (every row skipped or failed; see the reasons above)",
                    fg="red", err=True)
        ctx.exit(2)
    if "failed" in statuses:
        failed = sorted({f"{r['runtime']} ({r['device']})" for r in result["records"] if r["status"] == "failed"})
        click.secho(f"error: {len(failed)} runtime(s) failed: {', '.join(failed)}; the others were measured",
                    fg="red", err=True)
        ctx.exit(1)


PREDICT_RUNTIMES = tuple(FORMATS)  # every runtime in the registry; pytorch runs the state_dict


@cli.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("--runtime", type=click.Choice(PREDICT_RUNTIMES), default=DEFAULT_RUNTIME, show_default=True,
              help="An exported format (checked against the manifest's sha256), or pytorch (the state_dict).")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True)
@click.option("--top-k", type=click.IntRange(1, 10), default=3, show_default=True, help="How many digits to list.")
@click.option("--device", type=click.Choice(list(DEVICE_CHOICES)), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, callback=_positive, help="Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of records.")
@click.pass_context
def predict_cmd(ctx, inputs, runtime, artifacts, top_k, device, threads, as_json) -> None:
    """Predict the digit in image files, or in every image in folders.

    Any image Pillow reads works (PNG, JPEG, ..., black on white or white on black): it is converted
    the way MNIST was made (cropped to the digit, scaled to 20 px, centred by mass in 28x28). One line
    per file: file, digit, confidence, top-k. A file that cannot be read is reported and skipped;
    the exit code is then 1.
    """
    from .predict import predict_files

    records = predict_files(inputs, artifacts=artifacts, runtime=runtime, top=top_k, device=device,
                            threads=threads)
    failed = [r for r in records if "error" in r]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        for r in failed:
            click.secho(f"error: {r['error']}", fg="red", err=True)
    else:
        width = max(len(r["file"]) for r in records)
        for r in records:
            if "error" in r:
                click.secho(f"error: {r['error']}", fg="red", err=True)
                continue
            best = ", ".join(f"{t['digit']} {100 * t['probability']:5.1f}%" for t in r["top_k"])
            click.echo(f"{r['file']:<{width}}  {r['digit']}  {100 * r['confidence']:5.1f}%   top-{top_k}: {best}")
    if failed:
        click.secho(f"{len(failed)} of {len(records)} file(s) could not be predicted", fg="red", err=True)
        ctx.exit(1)


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. The default is this machine only; 0.0.0.0 opens it to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--runtime", type=click.Choice(PREDICT_RUNTIMES), default=DEFAULT_RUNTIME, show_default=True,
              help="An exported format (checked against the manifest's sha256), or pytorch (the state_dict).")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Server processes on the one port, each with its own model (default: the usable cores).")
@click.option("--reuse-port/--shared-socket", default=True, show_default=True,
              help="With several workers: a listening socket per worker (SO_REUSEPORT, connections spread evenly "
                   "by the kernel) or one socket they all accept from.")
@click.option("--threads", type=int, default=None, callback=_positive,
              help="Runtime intra-op threads per worker (default: the usable cores // --workers, at least 1).")
@click.option("--max-batch-size", type=click.IntRange(0, 4096), default=64, show_default=True,
              help="Dynamic batching of JSON /predict and v2 infer: most rows per model call (0 or 1: off). "
                   "On by default: +20-40% req/s under concurrent load, measured (README, Serving).")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="Dynamic batching: longest a request waits for others to join its batch, in microseconds.")
@click.option("--preferred-batch-sizes", default="", metavar="N,N,...",
              help="Dynamic batching: batch sizes to cut at when the delay runs out (comma-separated).")
@click.option("--max-body", type=click.IntRange(1024, 64 << 20), default=1 << 20, show_default=True,
              help="Largest request body in bytes; larger ones are answered 413 without being read.")
@click.option("--max-connections", type=click.IntRange(1, None), default=None,
              help="Open connections per process; more are closed at once (default: what the open-file limit "
                   "allows, at most 4096).")
@click.option("--request-timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds for a request (headers and body) to arrive whole; slower ones are answered 408.")
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_cmd(host, port, runtime, artifacts, device, workers, reuse_port, threads, max_batch_size, max_queue_delay_us,
              preferred_batch_sizes, max_body, max_connections, request_timeout, access_log, log_level) -> None:
    """Serve the model over HTTP until Ctrl-C: a drawing page at /, POST /predict, /docs, /metrics.

    The artifact is loaded once, after its sha256 is checked against the manifest. Endpoints:
    POST /predict (JSON {"pixels": [784 values 0..255]} or a multipart image in 'file'),
    POST /predict/batch, GET /health, GET /model, GET /metrics (Prometheus), GET /docs (OpenAPI).
    """
    from .predict import load_model
    from .serve import create_app, is_loopback, run_server
    from .serve.workers import run_workers, threads_per_worker, usable_cores

    workers = workers or usable_cores()
    threads = threads_per_worker(workers, threads)
    try:
        preferred = tuple(int(p) for p in preferred_batch_sizes.replace(" ", "").split(",") if p)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {preferred_batch_sizes!r}",
                                 param_hint="--preferred-batch-sizes") from None
    if preferred and (max_batch_size <= 1 or not all(1 <= p <= max_batch_size for p in preferred)):
        raise click.BadParameter(f"preferred sizes must lie in 1..--max-batch-size ({max_batch_size}), got "
                                 f"{list(preferred)}", param_hint="--preferred-batch-sizes")
    # Loaded here once even with several workers: a bad artifact is one clear error before anything starts.
    model = load_model(artifacts=artifacts, runtime=runtime, device=device, threads=threads)
    batching = {"max_batch_size": max_batch_size, "max_queue_delay_us": max_queue_delay_us,
                "preferred_batch_sizes": preferred}
    sha = str(model.entry.get("sha256") or "")[:12]
    where = f"page http://{host}:{port}/  API docs http://{host}:{port}/docs" if port else "port chosen below"
    how = f"{workers} worker{'s' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}, " + (
        f"batching up to {max_batch_size} within {max_queue_delay_us} us" if max_batch_size > 1 else "no batching")
    click.echo(f"serving {model.manifest['model']['name']} from {artifacts} with {runtime} ({model.predictor.runtime}"
               f", {model.device}, sha256 {sha}...; {how}); {where}", err=True)
    if not is_loopback(host):
        click.secho(f"warning: listening on {host}: other machines can reach this server (no authentication)",
                    fg="yellow", err=True)
    server = {"log_level": log_level, "access_log": access_log, "max_connections": max_connections,
              "request_timeout": request_timeout}
    if workers == 1:
        run_server(create_app(model=model, max_body_bytes=max_body, **batching), host=host, port=port, **server)
        return
    del model
    app_kwargs = {"artifacts": artifacts, "runtime": runtime, "device": device, "threads": threads,
                  "max_body_bytes": max_body, **batching}
    try:
        run_workers(workers=workers, host=host, port=port, app_kwargs=app_kwargs, reuse_port=reuse_port,
                    announce=lambda line: click.echo(line, err=True), **server)
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None


PACKAGE_FORMATS = written_as(".onnx")  # the registry's formats written as .onnx files


@cli.command("package")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("package"), show_default=True,
              help="Folder to write model_repository/ and inferenceservice.yaml into.")
@click.option("--format", "fmt", type=click.Choice(PACKAGE_FORMATS), default="onnx", show_default=True,
              help="Which ONNX export to package (it must have passed its parity gate).")
@click.option("--name", default=None, help="Model name on Triton and KServe. Default: the manifest's model name.")
@click.option("--model-version", type=int, default=1, show_default=True, callback=_positive,
              help="Triton version folder.")
@click.option("--max-batch-size", type=int, default=256, show_default=True, callback=_positive)
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=0, show_default=True,
              help="Dynamic batching: longest a request waits for others to join its batch.")
@click.option("--preferred-batch-size", "preferred", type=int, multiple=True,
              help="Dynamic batching: a preferred batch size (repeatable).")
@click.option("--instances", type=int, default=1, show_default=True, callback=_positive,
              help="Model instances (instance_group count).")
@click.option("--instance-kind", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True)
@click.option("--storage-uri", default=None,
              help="KServe storageUri of the uploaded model_repository folder. Default: a placeholder to fill in.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model folder of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def package_cmd(artifacts, out, fmt, name, model_version, max_batch_size, max_queue_delay_us, preferred, instances,
                instance_kind, storage_uri, overwrite, as_json) -> None:
    """Package the ONNX export for a cluster: a Triton model repository and a KServe InferenceService.

    Writes OUT/model_repository/NAME/config.pbtxt (platform onnxruntime_onnx, dynamic batching),
    OUT/model_repository/NAME/VERSION/model.onnx (the export, checked against the manifest's sha256)
    and OUT/inferenceservice.yaml (KServe v1beta1, modelFormat onnx, protocol v2). Run the repository
    with `tritonserver --model-repository OUT/model_repository`, or upload it and apply the YAML.
    """
    import time

    from .package import STORAGE_URI_PLACEHOLDER, PackageConfig, package_artifacts

    t0 = time.perf_counter()
    cfg = PackageConfig(name=name, format=fmt, version=model_version, max_batch_size=max_batch_size,
                        max_queue_delay_us=max_queue_delay_us, preferred_batch_sizes=tuple(preferred),
                        instances=instances, instance_kind=instance_kind,
                        storage_uri=storage_uri or STORAGE_URI_PLACEHOLDER, overwrite=overwrite)
    result = package_artifacts(artifacts=artifacts, out=out, config=cfg)
    seconds = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"{result.model_path}  {result.size_bytes:,} bytes  sha256 {result.sha256[:12]}...  {seconds:.2f} s")
    click.echo(f"{result.config_path}  platform onnxruntime_onnx, max_batch_size {max_batch_size}, "
               f"inputs {', '.join(f'{s.name} {s.datatype} {list(s.dims)}' for s in result.inputs)}")
    click.echo(f"{result.inference_service_path}  KServe InferenceService '{result.name}'")
    if storage_uri is None:
        click.echo("fill in storageUri in the InferenceService once the repository is uploaded", err=True)


def main() -> None:
    cli(prog_name="mnist-deploy")


if __name__ == "__main__":
    main()
