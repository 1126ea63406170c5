"""Typed errors. Each class carries what it means to both front ends: ``exit_code`` for the CLI (one
line on stderr and that exit code) and ``http_status`` for the server (one handler maps every route's
errors through it; see :mod:`mnist_deploy.serve.routes`). Expected client errors are 4xx; a failure of
this machine or its files that reaches a request is 5xx."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line error on stderr, a skipped bench row or an HTTP 4xx body shows of a third-party failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MnistDeployError(Exception):
    """Base class for expected failures; ``exit_code`` is what the CLI exits with, ``http_status`` what
    the server answers."""

    exit_code = 1
    http_status = 500


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


class RuntimeUnavailable(MnistDeployError):
    """A runtime or device is not available on this machine (missing package, no GPU)."""

    exit_code = 2
    http_status = 503


class InputError(MnistDeployError):
    """User input (an image, a pixel array, an option value) is invalid."""

    exit_code = 2
    http_status = 422


class BadRequest(InputError):
    """A request body cannot be read at all: empty, not UTF-8, not JSON, not valid compressed data."""

    http_status = 400


class NotFound(InputError):
    """A request names something this server does not have (a model, a version, a static file)."""

    http_status = 404


class PayloadTooLarge(InputError):
    """A request body is over the size limit (as sent, or once decompressed)."""

    http_status = 413


class UnsupportedMedia(InputError):
    """A request's Content-Type is not one the route reads."""

    http_status = 415


class NotReady(MnistDeployError):
    """The server's model is not loaded yet."""

    http_status = 503


class BatcherClosed(MnistDeployError):
    """The batcher is closed (the server is shutting down): the request was not run."""

    http_status = 503
