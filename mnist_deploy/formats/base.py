"""What a registry entry is: the :class:`Predictor` call signature, the :class:`Format` entry with its
options, parity spec, devices, availability check, exporter and loader, and the table itself.

A leaf of the registry package: the runtime families (``torch_family``, ``onnx_family``,
``openvino_family``) build entries from these types and :mod:`mnist_deploy.formats` puts them in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, MnistDeployError, RuntimeUnavailable, first_line

DEFAULT_RUNTIME = "onnx"  # what predict and serve load when no --runtime is given
UNAVAILABLE_ENV = "MNIST_DEPLOY_UNAVAILABLE"  # formats / devices to treat as missing: "openvino-bf16,cuda"
RULABLE_DEVICES = ("cuda",)  # the devices that variable may rule out (CPU is every format's fallback)
METADATA_FILE = "mnist_deploy.json"  # inside .pt / .pt2 archives: the same metadata as the ONNX props
MAX_EXPORTED_BATCH = 1 << 20  # the largest batch an exported artifact's dynamic batch axis declares


class LoadError(MnistDeployError):
    """An artifact whose sha256 matched cannot be loaded by its runtime (truncated, malformed, wrong kind)."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Predictors: one call signature for every runtime.


class Predictor:
    """A loaded model. ``predictor(x)`` maps float32 (N, *input_shape) to float32 logits (N, 10).

    ``prepare`` / ``run`` / ``finish`` split that call so a benchmark can time the runtime call
    alone: ``prepare`` puts the input where the runtime wants it (a tensor on the device, an
    OrtValue...), ``run`` is the runtime call, ``finish`` waits for it and returns numpy.
    ``details`` is what the runtime says it actually applied (precision, performance mode), recorded
    with every bench row and shown by ``GET /model``.
    """

    runtime: str = ""
    device: str = "cpu"
    details: dict[str, Any] = {}

    def prepare(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def run(self, prepared: Any) -> Any:
        raise NotImplementedError

    def finish(self, out: Any) -> np.ndarray:
        raise NotImplementedError

    # A runtime that runs outside this process can time its own calls there, as its users would see
    # them: ``time_calls(prepared, *, warmup, min_time, min_calls, sync)`` returns per-call ns like
    # bench.timing.time_calls, and the bench uses it instead of timing ``run`` from Python.
    time_calls: Callable[..., np.ndarray] | None = None
    # Such a runtime may also run a whole pass over many images itself: ``run_batches(x, batch)`` returns
    # the logits of ``x`` computed ``batch`` images per runtime call (the parity gate's batch-1 pass as
    # one request, not 10,000 round trips); each call is still the runtime's call on ``batch`` images.
    run_batches: Callable[..., np.ndarray] | None = None

    def sync(self) -> None:
        """Block until queued work is done (CUDA); a no-op on CPU."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.finish(self.run(self.prepare(np.ascontiguousarray(x, dtype=np.float32))))


# ---------------------------------------------------------------------------------------------
# Options and parity: typed, with defaults, written once.


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None) -> Any:
    """A dataclass field for a format option; the CLI's ``--name`` option and its --help come from it."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass(frozen=True)
class NoOptions:
    """A format without options."""


def option_fields(options_type: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_type))


def validate_options(options: Any) -> None:
    """Check every field against its ``choices`` / ``minimum``; then the dataclass's own ``validate()``."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise InputError(f"{flag}: unknown value {value!r}; choose one of {', '.join(map(str, choices))}")
        minimum = f.metadata.get("minimum")
        if minimum is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < minimum):
            raise InputError(f"{flag} must be a number >= {minimum}, got {value!r}")
    check = getattr(options, "validate", None)
    if check is not None:
        check()


@dataclass(frozen=True)
class ParitySpec:
    """How a format is judged against PyTorch eager on the 10,000 test images.

    ``logits``: every logit within ``atol + rtol * |reference|`` and top-1 agreement >= min_agreement.
    ``predictions`` (reduced precision: INT8, bf16): agreement >= min_agreement and an accuracy drop of
    at most ``max_accuracy_drop`` (a fraction: 0.003 is 0.3 points).
    """

    kind: str = "logits"
    atol: float = 1e-4
    rtol: float = 0.0
    min_agreement: float = 1.0
    max_accuracy_drop: float = 0.003

    def criteria(self) -> dict:
        if self.kind == "predictions":
            return {"kind": "predictions", "min_agreement": self.min_agreement,
                    "max_accuracy_drop": self.max_accuracy_drop}
        return {"kind": "logits", "atol": self.atol, "rtol": self.rtol, "min_agreement": self.min_agreement}


FP32_PARITY = ParitySpec("logits", atol=1e-4, rtol=0.0, min_agreement=1.0)
REDUCED_PARITY = ParitySpec("predictions", min_agreement=0.995, max_accuracy_drop=0.003)


# ---------------------------------------------------------------------------------------------
# Exporting.


@dataclass
class ExportContext:
    """What an exporter needs besides the model and its options."""

    example: Any  # torch.Tensor (B, *input_shape), float32, CPU
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props; a JSON file in .pt/.pt2
    workdir: Path | None = None  # where intermediate files may go (the export's staging folder)
    calibration: Callable[[int], np.ndarray] | None = None  # n -> float32 training images (INT8 calibration)
    passed: dict[str, Path] = field(default_factory=dict)  # formats that passed in this run -> their main file
    # n -> (float32 images, labels): held-out training images, disjoint from every calibration set and never
    # test images, on which an exporter may tune (the INT8 accuracy ladder); the verdict stays on the test set.
    tuning: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    criteria: dict | None = None  # the parity criteria the format being exported will be judged by
    notes: dict = field(default_factory=dict)  # what the exporter records for this format (into its manifest entry)


# ---------------------------------------------------------------------------------------------
# The entry.


def _always(_device: str) -> str | None:
    return None


@dataclass(frozen=True)
class Format:
    """One runtime the toolkit can run a model in; everything about it lives here.

    ``files`` are the names the artifact is written as (the first is the one the loader opens; the
    others sit beside it). A format with ``source="state_dict"`` has no files of its own: it runs the
    trained state_dict (PyTorch eager, torch.compile) and is never exported.
    ``load(path, *, device, threads, manifest)`` returns a :class:`Predictor`;
    ``export(model, path, options, ctx)`` writes ``files`` into ``path.parent``.
    """

    name: str
    runtime: str  # the name bench rows and the server report
    description: str
    files: tuple[str, ...] = ()
    load: Callable[..., Predictor] | None = None
    export: Callable[[Any, Path, Any, ExportContext], None] | None = None
    options: type = NoOptions
    parity: ParitySpec = FP32_PARITY
    devices: tuple[str, ...] = ("cpu", "cuda")
    available: Callable[[str], str | None] = _always  # device -> None, or why it cannot run there
    packages: tuple[str, ...] = ()  # the package versions recorded with every result
    check: Callable[[Path, dict], None] | None = None  # extra verify checks: check(path, manifest entry)
    roofline: bool = True  # fp32 arithmetic, comparable with the fp32 matmul peak
    variant_of: str = ""  # a reduced-precision variant of this (fp32) format: bench compares the two
    # What a cold start includes beyond loading, for runtimes that do more on their first call: called
    # after the load and before the first call, it returns a function that, called after the first
    # call, says what happened (torch.compile: "cold start includes compilation (inductor cache hit)");
    # bench puts that note on the runtime's rows.
    cold_start: Callable[[], Callable[[], str]] | None = None
    source: str = ""  # "state_dict": runs the trained weights, nothing to export
    copy_of: str = ""  # the format whose file this one runs in another runtime (not offered where that file is)
    versions: Callable[[], dict] | None = None  # versions of a runtime that is not a Python package (Node)
    deprecated: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The manifest entry this format reads."""
        return self.source or self.name

    @property
    def exportable(self) -> bool:
        return self.export is not None and not self.source

    def default_options(self) -> Any:
        return self.options()

    def unavailable(self, device: str = "cpu") -> str | None:
        """Why this format cannot run on ``device`` here (or None): ruled out by $MNIST_DEPLOY_UNAVAILABLE,
        a device it does not run on, a package that is missing, or the entry's own check."""
        kind = device.split(":", 1)[0]
        ruled = ruled_out(self, kind)
        if ruled:
            return ruled
        if kind not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {kind}"
        missing = [p for p in self.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
        if missing:
            return f"{', '.join(missing)} is not installed (pip install {' '.join(missing)})"
        return self.available(device)


# ---------------------------------------------------------------------------------------------
# The table.

FORMATS: dict[str, Format] = {}


def register(fmt: Format, *, replace: bool = False) -> Format:
    """Add ``fmt`` to the registry (in order). Every stage and the CLI pick it up from here."""
    if fmt.name in FORMATS and not replace:
        raise ValueError(f"format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    FORMATS.pop(name, None)


@contextlib.contextmanager
def registered(fmt: Format) -> Iterator[Format]:
    """Register ``fmt`` for the block (tests, plugins tried out)."""
    register(fmt)
    try:
        yield fmt
    finally:
        unregister(fmt.name)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}") from None


def resolve(name: str) -> Format:
    """A format by its name, its runtime name or an alias (bench's --runtimes accepts all three)."""
    key = name.strip().lower()
    for fmt in FORMATS.values():
        if key == fmt.name or key == fmt.runtime or key in fmt.aliases:
            return fmt
    raise InputError(f"unknown runtime '{name}'; choose from {', '.join(FORMATS)} or all "
                     f"(runtime names {', '.join(f.runtime for f in FORMATS.values())} work too)")


def format_names() -> tuple[str, ...]:
    """Every format's name, in registry order: what predict's and serve's ``--runtime`` accept."""
    return tuple(FORMATS)


def runtime_names() -> tuple[str, ...]:
    """Every format's runtime name, in registry order: bench's row names (``onnxruntime``, ``torch.export``...)."""
    return tuple(f.runtime for f in FORMATS.values())


def ruled_out_names() -> tuple[str, ...]:
    """The names in $MNIST_DEPLOY_UNAVAILABLE (format names, runtime names, aliases, or ``cuda``),
    normalised to lower case. A name that means nothing is an :class:`InputError`: a typo must not
    quietly leave a format in."""
    raw = os.environ.get(UNAVAILABLE_ENV, "")
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    known = {*RULABLE_DEVICES}
    for fmt in FORMATS.values():
        known.update((fmt.name, fmt.runtime, *fmt.aliases))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"{UNAVAILABLE_ENV}={raw}: unknown name {', '.join(map(repr, unknown))}; use format "
                         f"names ({', '.join(FORMATS)}) or {', '.join(RULABLE_DEVICES)}, comma-separated")
    return names


def ruled_out(fmt: Format | None, device: str = "cpu") -> str | None:
    """The one-line reason when $MNIST_DEPLOY_UNAVAILABLE rules out ``fmt`` (or, with ``fmt=None``,
    the device ``device``) here, else None. Runs as if the capability were missing: on a fleet where
    a format must not be used, or in CI to test the "missing" path on a machine that has it."""
    names = ruled_out_names()
    if not names:
        return None
    kind = device.split(":", 1)[0].lower()
    hit = kind if kind in names else None
    if fmt is not None and hit is None:
        hit = next((n for n in names if n in (fmt.name, fmt.runtime, *fmt.aliases)), None)
    if hit is None:
        return None
    return f"ruled out by {UNAVAILABLE_ENV}={os.environ[UNAVAILABLE_ENV].strip()}"


def available(device: str = "cpu", names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The formats among ``names`` (default: every registered one) that can run on ``device`` here,
    by each entry's own availability check: what tests expect to see exported, measured and served."""
    return tuple(n for n in (FORMATS if names is None else names) if FORMATS[n].unavailable(device) is None)


def exportable() -> tuple[str, ...]:
    return tuple(n for n, f in FORMATS.items() if f.exportable)


def written_as(suffix: str) -> tuple[str, ...]:
    """The formats whose main file ends with ``suffix`` (``.onnx``: what ONNX consumers such as Triton run);
    a copy of another format's file (``copy_of``) is left out, as its original is there."""
    return tuple(n for n, f in FORMATS.items() if f.files and f.files[0].endswith(suffix) and not f.copy_of)


def packages() -> tuple[str, ...]:
    """Every package a registered format depends on, for version records."""
    out = ["numpy"]
    for fmt in FORMATS.values():
        out += [p for p in fmt.packages if p not in out]
    return tuple(out)


def option_types() -> dict[str, dataclasses.Field]:
    """Every option field of every format, once by name (a shared one, like ``opset``, once)."""
    out: dict[str, dataclasses.Field] = {}
    for fmt in FORMATS.values():
        for f in option_fields(fmt.options):
            out.setdefault(f.name, f)
    return out


def build_options(fmt: Format, values: dict[str, Any]) -> Any:
    """``fmt``'s options from ``values`` (a superset: each format takes the fields it has), validated."""
    names = {f.name for f in option_fields(fmt.options)}
    options = fmt.options(**{k: v for k, v in values.items() if k in names and v is not None})
    validate_options(options)
    return options


def load_predictor(name: str, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                   manifest: dict | None = None) -> Predictor:
    """Load ``path`` (already sha256-checked) as format ``name``. Whatever goes wrong in the runtime's
    loader is one :class:`LoadError` naming the file, never the runtime's traceback."""
    fmt = get_format(name)
    reason = fmt.unavailable(device)
    if reason:
        raise RuntimeUnavailable(f"{fmt.name} on {device}: {reason}")
    try:
        return fmt.load(Path(path), device=device, threads=threads, manifest=manifest or {})
    except MnistDeployError:
        raise
    except Exception as exc:  # runtimes raise RuntimeError, protobuf DecodeError, zipfile errors...
        raise LoadError(f"{path}: {fmt.runtime} cannot load it ({first_line(exc)}); re-export it with "
                        f"`mnist-deploy export --format {fmt.name}`") from None


# ---------------------------------------------------------------------------------------------
# Small shared helpers.


@contextlib.contextmanager
def quiet():
    """Keep deprecation chatter and exporter progress lines out of the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
