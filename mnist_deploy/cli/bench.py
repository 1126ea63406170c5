"""bench."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..bench.config import BENCH_DEVICES, BenchConfig
from ..errors import MnistDeployError
from ..formats import FORMATS
from .common import cache_dir_option, cli, data_dir_option, no_download_option, thread_count

BENCH_DEFAULTS = BenchConfig()


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
@click.option("--threads", type=int, default=None, callback=thread_count,
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
    from ..bench.report import format_table, write_outputs
    from ..bench.run import run_bench

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


