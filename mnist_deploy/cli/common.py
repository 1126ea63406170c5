"""The command group, its error handling and the options several commands share."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MnistDeployError


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




def positive(_ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}", param=param)
    return value


THREADS_PER_CORE = 4  # more threads than this per usable core only adds contention (and at ~30k, crashes)


def _usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_count(_ctx, param, value):
    """``--threads``: at least 1 and at most THREADS_PER_CORE x the usable cores, derived at run time.
    Unbounded, 100,000 segfaulted libgomp in ``train`` and hung ``serve`` without a word."""
    value = positive(_ctx, param, value)
    limit = THREADS_PER_CORE * _usable_cores()
    if value is not None and value > limit:
        raise click.BadParameter(f"{value} is more than {THREADS_PER_CORE} per usable core "
                                 f"({_usable_cores()} here); at most {limit}", param=param)
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



def stderr_console():
    from rich.console import Console

    return Console(stderr=True)
