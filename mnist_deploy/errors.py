"""Typed errors. The CLI turns each into one line on stderr and an exit code."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line error on stderr, a skipped bench row or an HTTP 4xx body shows of a third-party failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MnistDeployError(Exception):
    """Base class for expected failures; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class DataError(MnistDeployError):
    """A data file is missing, truncated, tampered with or cannot be fetched."""

    exit_code = 2


class CheckpointError(MnistDeployError):
    """A checkpoint is missing, unsafe, corrupt or does not match its model."""

    exit_code = 2


class ManifestError(MnistDeployError):
    """The manifest is missing, unreadable or does not describe the artifact asked for."""

    exit_code = 2


class IntegrityError(MnistDeployError):
    """An artifact's sha256 is not the one recorded in the manifest."""

    exit_code = 1


class ExportError(MnistDeployError):
    """A format could not be exported (exporter failure, unsupported opset, ...)."""

    exit_code = 1


class ParityError(MnistDeployError):
    """An exported artifact does not compute what the PyTorch model computes."""

    exit_code = 1


class RuntimeUnavailable(MnistDeployError):
    """A runtime or device is not available on this machine (missing package, no GPU)."""

    exit_code = 2


class InputError(MnistDeployError):
    """User input (an image, a pixel array, an option value) is invalid."""

    exit_code = 2
