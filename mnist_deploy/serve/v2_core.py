"""The Open Inference Protocol's model side, with no transport: what HTTP (:mod:`.v2`) and gRPC share.

Every function here takes plain Python and numpy values and raises the typed errors of
:mod:`mnist_deploy.errors` (each with its HTTP status; a gRPC server maps them to status codes:
:class:`~mnist_deploy.errors.NotFound` -> NOT_FOUND, :class:`~mnist_deploy.errors.NotReady` and
:class:`~mnist_deploy.errors.BatcherClosed` -> UNAVAILABLE, any other
:class:`~mnist_deploy.errors.InputError` -> INVALID_ARGUMENT). A request is handled in four calls::

    served = resolve(service, name, version)               # which model, which input form
    meta = metadata(served)                                 # (a metadata request stops here)
    x = input_batch(service, served, in_name, datatype, shape, array)   # validated (N, 784) float32
    wanted = output_names([...names asked for...])          # or output_names(None): logits only
    logits = await service.infer(x)                         # the shared batcher
    for name, y in output_arrays(wanted, logits): ...       # (name, float32 (N, 10)) each

One model, one input list: the loaded model is served under two names, each listing exactly one input
in its metadata (generic v2 tools send every input listed):

* ``<name>`` (e.g. ``mlp``): ``input``, FP32 ``[-1, *model shape]``, already normalised (what the
  exported model takes, what Triton would be sent), its value range in the metadata's ``parameters``;
* ``<name>-pixels``: ``pixels``, UINT8 ``[-1, 28, 28]`` (``[-1, 784]`` is accepted too), raw 0..255,
  normalised here with the manifest's mean and std.

``<name>`` also still takes ``pixels`` (requests from before the split keep working); it just no
longer lists it. Outputs: ``logits`` FP32 ``[-1, 10]``, and ``probabilities`` FP32 ``[-1, 10]``
on request. The version is the manifest's ``model.version``, or ``"1"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.normalize import manifest_normalization
from ..errors import InputError, NotFound
from ..predict import LoadedModel, softmax

INPUT, PIXELS = "input", "pixels"
PIXELS_SUFFIX = "-pixels"  # the model name of the pixels form: "<name>-pixels"
OUTPUTS = ("logits", "probabilities")
DATATYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}  # the protocol's names -> little-endian dtypes
INPUT_DATATYPE = {INPUT: "FP32", PIXELS: "UINT8"}
INPUT_SLACK = 1e-3  # of the normalised range: room for a client's rounding, none for 3e38
ROW = 784  # values per image


@dataclass(frozen=True)
class ServedModel:
    """One model name the server answers to: the loaded model, the name and version, and its input form.

    ``input`` is the one input its metadata lists (:data:`INPUT` or :data:`PIXELS`); ``accepts`` is what
    a request may send (the base name also takes :data:`PIXELS`, as it did when it listed both)."""

    model: LoadedModel
    name: str
    version: str
    input: str
    accepts: tuple[str, ...]


def base_name(m: LoadedModel) -> str:
    """The manifest's model name (``mlp``, ``cnn``): the name of the ``input`` (FP32) form."""
    return str(m.manifest["model"]["name"])


def model_version(m: LoadedModel) -> str:
    """The manifest's ``model.version``, or ``"1"`` (a Triton repository's first version)."""
    return str(m.manifest["model"].get("version", "1"))


def served_models(m: LoadedModel) -> tuple[ServedModel, ServedModel]:
    """Both names ``m`` is served under: ``<name>`` (``input``, FP32) and ``<name>-pixels`` (``pixels``, UINT8)."""
    name, version = base_name(m), model_version(m)
    return (ServedModel(m, name, version, INPUT, (INPUT, PIXELS)),
            ServedModel(m, name + PIXELS_SUFFIX, version, PIXELS, (PIXELS,)))


def resolve(service: Any, name: str, version: str | None = None) -> ServedModel:
    """A request's model name and version -> the :class:`ServedModel` that answers it.

    ``service`` is the server's :class:`~.service.Service` (only its ``ready()`` is used). ``version``
    None or ``""`` means the model's one version. Raises :class:`~mnist_deploy.errors.NotReady` (503,
    UNAVAILABLE) before the model is loaded, and :class:`~mnist_deploy.errors.NotFound` (404,
    NOT_FOUND) for an unknown name, naming both served models, or an unknown version.
    """
    m = service.ready()
    for served in served_models(m):
        if name == served.name:
            if version not in (None, "", served.version):
                raise NotFound(f"unknown version '{version}' of model '{name}'; it has version '{served.version}'")
            return served
    one, two = served_models(m)
    raise NotFound(f"unknown model '{name}'; this server serves '{one.name}' (input '{INPUT}', FP32 normalised) "
                   f"and '{two.name}' (input '{PIXELS}', UINT8 0..255)")


def input_range(m: LoadedModel) -> tuple[float, float]:
    """The values an ``input`` (FP32, normalised) tensor may hold: normalised pixels 0 and 255, widened by
    :data:`INPUT_SLACK` of the span so that a client's own float rounding is never refused."""
    norm = manifest_normalization(m.manifest)
    ends = (np.array([0.0, 255.0], np.float32) / np.float32(255.0) - np.float32(norm["mean"])) / np.float32(norm["std"])
    lo, hi = float(ends[0]), float(ends[1])
    slack = INPUT_SLACK * (hi - lo)
    return lo - slack, hi + slack


def metadata(served: ServedModel) -> dict:
    """The protocol's ``$metadata_model_response`` for a served name: its one input, both outputs."""
    m = served.model
    if served.input == INPUT:
        lo, hi = input_range(m)
        tensor = {"name": INPUT, "datatype": "FP32", "shape": [-1, *m.input_shape],
                  "parameters": {"min": round(lo, 6), "max": round(hi, 6)}}
    else:
        tensor = {"name": PIXELS, "datatype": "UINT8", "shape": [-1, 28, 28]}
    return {"name": served.name, "versions": [served.version], "platform": f"mnist-deploy/{m.runtime}",
            "inputs": [tensor], "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, 10]} for n in OUTPUTS]}


_SHAPE_TYPES, _DIM_TYPES = (list, tuple), (int, np.integer)  # built once: `int | np.integer` is a new object per call


def check_input(service: Any, served: ServedModel, name: Any, datatype: Any, shape: Any) -> int:
    """Validate an input's name, datatype and shape for ``served``; return its element count (N * 784).

    Call it before reading a tensor's bytes (the byte count to expect is the count times
    ``DATATYPES[datatype].itemsize``). ``service.max_batch`` caps N. Raises
    :class:`~mnist_deploy.errors.InputError` (400 on v2, INVALID_ARGUMENT) saying what is wrong.
    """
    if name not in served.accepts:
        if name in INPUT_DATATYPE:  # the other form's input: say which model takes it
            other = served.name.removesuffix(PIXELS_SUFFIX) if name == INPUT else served.name + PIXELS_SUFFIX
            raise InputError(f"model '{served.name}' takes input '{served.input}'; send '{name}' to model '{other}'")
        raise InputError(f"unknown input '{name}'; model '{served.name}' takes '{served.input}' "
                         f"({INPUT_DATATYPE[served.input]}{', normalised' if served.input == INPUT else ', 0..255'})")
    want = INPUT_DATATYPE[name]
    if datatype != want:
        raise InputError(f"input '{name}' has datatype {want}, got {datatype!r}")
    if (not isinstance(shape, _SHAPE_TYPES) or not shape
            or not all(isinstance(d, _DIM_TYPES) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    shape = [int(d) for d in shape]
    count = math.prod(shape)  # Python ints: exact, however large the claim
    if len(shape) < 2 or count != shape[0] * ROW or shape[0] < 1:
        raise InputError(f"input '{name}': shape {shape} is not a batch of 28x28 images ([N, 784], [N, 28, 28] "
                         "or the model's own shape)")
    if shape[0] > service.max_batch:
        raise InputError(f"input '{name}': at most {service.max_batch} images per request, got {shape[0]}")
    return count


def array_from_bytes(name: str, datatype: str, count: int, raw: bytes | memoryview) -> np.ndarray:
    """Raw tensor bytes (little-endian, row-major, no padding: the binary extension and gRPC's
    ``raw_input_contents``) -> a flat array of ``count`` elements of ``datatype``, without a copy.

    The byte count must be exactly ``count`` times the element size; else an
    :class:`~mnist_deploy.errors.InputError`."""
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InputError(f"input '{name}': {len(raw):,} bytes of data, but shape x {datatype} size is "
                         f"{count * dtype.itemsize:,} bytes ({count} x {dtype.itemsize})")
    return np.frombuffer(raw, dtype=dtype)


def input_batch(service: Any, served: ServedModel, name: Any, datatype: Any, shape: Any, data: Any, *,
                count: int | None = None) -> np.ndarray:
    """One request input -> the model's normalised float32 (N, 784) batch, validated before any model call.

    ``data`` is a numpy array holding ``prod(shape)`` numbers in row-major order, flat or of any shape:
    JSON ``data`` as ``np.asarray`` read it (ints, floats), :func:`array_from_bytes` of raw bytes, or
    a gRPC typed contents field; anything else (a list) is passed through ``np.asarray``. ``service``
    gives ``max_batch`` and ``normalize(m, pixels)``. Checks, each an
    :class:`~mnist_deploy.errors.InputError` with one clear message: the name is one ``served``
    accepts, the datatype is that input's, the shape is a batch of 28x28 images of at most
    ``max_batch``, the data holds that many numbers, finite; ``input`` values in :func:`input_range`,
    ``pixels`` integers in 0..255. ``count`` is :func:`check_input`'s answer when the caller has already
    called it (to read raw bytes): the checks then run once, not twice.
    """
    if count is None:
        count = check_input(service, served, name, datatype, shape)
    if not isinstance(data, np.ndarray):
        try:
            data = np.asarray(data)
        except (ValueError, TypeError, OverflowError):
            raise InputError(f"input '{name}': data must be a flat or nested list of numbers") from None
    if data.dtype.kind not in "iuf" or data.size != count:
        raise InputError(f"input '{name}': data must hold {count} numbers (shape {list(shape)}), got "
                         f"{data.size} values of kind {data.dtype.kind!r}")
    rows = count // ROW
    if name == INPUT:
        x = np.array(data, dtype=np.float32).reshape(rows, ROW)  # a copy: raw bytes are read-only, unaligned
        lo, hi = input_range(served.model)
        if not np.isfinite(x).all():
            raise InputError(f"input '{name}': data must be finite numbers")
        if ((x < lo) | (x > hi)).any():  # 3e38 is finite, but the model's logits would not be
            raise InputError(f"input '{name}': FP32 data must be normalised pixels, in {lo:.4f}..{hi:.4f} "
                             "(the model's metadata states the range)")
        return x
    if data.dtype != np.uint8:  # JSON numbers: check what a uint8 tensor cannot hold
        x = data.astype(np.float32).reshape(rows, ROW)
        if not np.isfinite(x).all():
            raise InputError(f"input '{name}': data must be finite numbers")
        if data.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
            raise InputError(f"input '{name}': UINT8 data must be integers")
        if ((x < 0) | (x > 255)).any():
            raise InputError(f"input '{name}': UINT8 data must be in 0..255")
        data = x
    return service.normalize(served.model, data.reshape(rows, ROW))


def output_names(wanted: list[str] | None) -> list[str]:
    """The output names a request asks for, validated: each from :data:`OUTPUTS`, each at most once (so a
    response is at most two tensors). None or ``[]`` (no outputs named) is ``["logits"]``: the
    spec's "all outputs the model produces", and the exported model produces ``logits`` only."""
    if not wanted:
        return ["logits"]
    if not all(isinstance(n, str) and n in OUTPUTS for n in wanted):
        raise InputError(f'outputs must be a list of {{"name": ...}} with names from {list(OUTPUTS)}')
    if len(set(wanted)) != len(wanted):
        raise InputError(f"outputs names each output at most once, got {len(wanted)} entries for "
                         f"{len(set(wanted))} names")
    return list(wanted)


def output_arrays(wanted: list[str], logits: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(validated output names, the batch's logits) -> ``[(name, float32 C-contiguous (N, 10)), ...]``
    in the order asked for; ``probabilities`` is the softmax of the logits, computed here."""
    out = []
    for name in wanted:
        y = logits if name == "logits" else softmax(logits)
        out.append((name, np.ascontiguousarray(y, dtype=np.float32)))
    return out


__all__ = ["DATATYPES", "INPUT", "OUTPUTS", "PIXELS", "PIXELS_SUFFIX", "ServedModel", "array_from_bytes",
           "base_name", "check_input", "input_batch", "input_range", "metadata", "model_version", "output_arrays",
           "output_names", "resolve", "served_models"]
