"""predict and serve."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..devices import DEVICE_CHOICES
from ..formats import DEFAULT_RUNTIME, FORMATS
from .common import cli, thread_count

PREDICT_RUNTIMES = tuple(FORMATS)  # every runtime in the registry; pytorch runs the state_dict


@cli.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE_OR_DIR...")
@click.option("--runtime", type=click.Choice(PREDICT_RUNTIMES), default=DEFAULT_RUNTIME, show_default=True,
              help="An exported format (checked against the manifest's sha256), or pytorch (the state_dict).")
@click.option("--artifacts", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts"),
              show_default=True)
@click.option("--top-k", type=click.IntRange(1, 10), default=3, show_default=True, help="How many digits to list.")
@click.option("--device", type=click.Choice(list(DEVICE_CHOICES)), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, callback=thread_count, help="Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of records.")
@click.pass_context
def predict_cmd(ctx, inputs, runtime, artifacts, top_k, device, threads, as_json) -> None:
    """Predict the digit in image files, or in every image in folders.

    Any image Pillow reads works (PNG, JPEG, ..., black on white or white on black): it is converted
    the way MNIST was made (cropped to the digit, scaled to 20 px, centred by mass in 28x28). One line
    per file: file, digit, confidence, top-k. A file that cannot be read is reported and skipped;
    the exit code is then 1.
    """
    from ..predict import predict_files

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
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="Port of the Open Inference Protocol's gRPC service (inference.GRPCInferenceService; 8001 as "
                   "Triton), on --host, in every worker; 0: no gRPC.")
@click.option("--grpc-acceptors", type=click.IntRange(1, 16), default=4, show_default=True,
              help="gRPC servers per worker on --grpc-port, each taking calls in parallel with the others "
                   "(grpcio's asyncio server takes one call at a time).")
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
@click.option("--threads", type=int, default=None, callback=thread_count,
              help="Runtime intra-op threads per worker (default: the usable cores // --workers, at least 1).")
@click.option("--max-batch-size", type=click.IntRange(0, 4096), default=64, show_default=True,
              help="Dynamic batching of /predict, /predict/batch and v2 infer: most rows per model call (0 or 1: off). "
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
@click.option("--loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop", show_default=True,
              help="Event loop. uvloop serves more requests per core; asyncio's own is fairer when one process is "
                   "saturated (uvloop's p99 grows to hundreds of ms there; measured, README, Serving).")
@click.option("--drain-timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="On SIGTERM or Ctrl-C: seconds to answer the requests already received (readiness turns 503 at "
                   "once); what is still unanswered then gets a 503.")
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_cmd(host, port, grpc_port, grpc_acceptors, runtime, artifacts, device, workers, reuse_port, threads, max_batch_size,
              max_queue_delay_us, preferred_batch_sizes, max_body, max_connections, request_timeout, loop, drain_timeout, access_log,
              log_level) -> None:
    """Serve the model over HTTP until Ctrl-C: a drawing page at /, POST /predict, /docs, /metrics.

    The artifact is loaded once, after its sha256 is checked against the manifest. Endpoints:
    POST /predict (JSON {"pixels": [784 values 0..255]} or a multipart image in 'file'),
    POST /predict/batch, GET /health, GET /model, GET /metrics (Prometheus), GET /docs (OpenAPI), the Open
    Inference Protocol (KServe v2) under /v2, and its gRPC service on --grpc-port.
    """
    from ..errors import InputError
    from ..predict import load_model
    from ..serve import ServeConfig, create_app, is_loopback, run_server
    from ..serve.workers import run_workers, threads_per_worker, usable_cores

    workers = workers or usable_cores()
    try:
        preferred = tuple(int(p) for p in preferred_batch_sizes.replace(" ", "").split(",") if p)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {preferred_batch_sizes!r}",
                                 param_hint="--preferred-batch-sizes") from None
    try:
        config = ServeConfig(
            artifacts=artifacts, runtime=runtime, device=device, threads=threads_per_worker(workers, threads),
            host=host, port=port, grpc_port=grpc_port, grpc_acceptors=grpc_acceptors, workers=workers, reuse_port=reuse_port,
            max_body_bytes=max_body,
            max_connections=max_connections, request_timeout=request_timeout, max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us, preferred_batch_sizes=preferred, loop=loop,
            access_log=access_log, log_level=log_level, drain_timeout=drain_timeout)
    except InputError as exc:
        hint = "--grpc-port" if str(exc).startswith("grpc_port") else "--preferred-batch-sizes"
        raise click.BadParameter(str(exc), param_hint=hint) from None
    # Loaded here once even with several workers: a bad artifact is one clear error before anything starts.
    model = load_model(artifacts=artifacts, runtime=runtime, device=device, threads=config.threads)
    if grpc_port:  # before anything starts too: grpcio missing, or a taken port, is one line now
        from ..serve.protos import load_protos

        load_protos()  # generated once here, not by every worker at once; says so if grpcio is missing
        from ..serve.grpc_v2 import check_port

        check_port(host, grpc_port)
    click.echo(_banner(config, model), err=True)
    if not is_loopback(host):
        click.secho(f"warning: listening on {host}: other machines can reach this server (no authentication)",
                    fg="yellow", err=True)
    if workers == 1:
        run_server(create_app(config, model=model), config)
        return
    del model
    try:
        run_workers(config, announce=lambda line: click.echo(line, err=True))
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None


def _banner(config, model) -> str:
    c = config
    sha = str(model.entry.get("sha256") or "")[:12]
    where = f"page http://{c.host}:{c.port}/  API docs http://{c.host}:{c.port}/docs" if c.port else "port chosen below"
    if c.grpc_port:
        where += f"  gRPC {c.host}:{c.grpc_port}"
    how = f"{c.workers} worker{'s' if c.workers > 1 else ''} x {c.threads} thread{'s' if c.threads > 1 else ''}, " + (
        f"batching up to {c.max_batch_size} within {c.max_queue_delay_us} us" if c.batching else "no batching")
    return (f"serving {model.manifest['model']['name']} from {c.artifacts} with {c.runtime} ({model.predictor.runtime}"
            f", {model.device}, sha256 {sha}...; {how}); {where}")
