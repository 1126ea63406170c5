"""The command line: parses options, calls library functions with keyword arguments, prints results.

Expected failures (:class:`MnistDeployError`) become one line on stderr and a non-zero exit code. One
module per group of commands; importing them registers the commands on :data:`cli`.
"""

from __future__ import annotations

from . import bench, export, serve, train  # noqa: F401  (registers the commands)
from .common import cli
from .export import FORMAT_NAMES, PACKAGE_FORMATS
from .serve import PREDICT_RUNTIMES
from .train import MODEL_NAMES


def main() -> None:
    cli(prog_name="mnist-deploy")


__all__ = ["FORMAT_NAMES", "MODEL_NAMES", "PACKAGE_FORMATS", "PREDICT_RUNTIMES", "cli", "main"]
