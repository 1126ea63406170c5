"""Package an exported ONNX artifact for a cluster: a Triton model repository, a KServe InferenceService,
and a Kubernetes Deployment + Service for this server (:mod:`.kubernetes`).

    <out>/model_repository/<name>/config.pbtxt     Triton's model configuration (text protobuf)
    <out>/model_repository/<name>/<version>/model.onnx
    <out>/inferenceservice.yaml                    KServe v1beta1, modelFormat onnx, protocol v2
    <out>/deployment.yaml                          a Deployment and a Service running `mnist-deploy serve`

The ONNX file is the one the manifest vouches for (its sha256 is checked before it is copied, and
the copy is checked again), so a package never carries a file that the parity gate did not pass.
Input and output names, datatypes and dims are read from the ONNX graph itself and cross-checked
against the manifest's input shape; the batch axis must be dynamic, since Triton prepends it.

The same repository runs on Triton (``tritonserver --model-repository <out>/model_repository``) and
on KServe, whose Triton runtime serves ``modelFormat: onnx`` from the storage URI (upload the
model_repository folder and fill in ``storageUri``). Both speak the Open Inference Protocol v2.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..artifacts.files import atomic_write_text, fsync_dir, sha256_file
from ..artifacts.manifest import load_manifest, manifest_path
from ..errors import ExportError, InputError, IntegrityError, ManifestError
from ..formats import artifact_path, written_as
from .kubernetes import (
    IMAGE_PLACEHOLDER,
    NAME,
    STORAGE_URI_PLACEHOLDER,
    check_image,
    deployment,
    inference_service,
)

__all__ = ["PackageConfig", "PackageResult", "TensorSpec", "onnx_tensor_specs", "package_artifacts", "triton_config"]

# The registry's formats that Triton's onnxruntime backend runs: those written as .onnx files.
ONNX_FORMATS = written_as(".onnx")
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "auto": "KIND_AUTO"}
_NAME = NAME
# Triton's ModelConfig field types (model_config.proto): a value outside them makes Triton refuse the
# config ("Value out of range"). version is int64 and names a folder, so at least 1.
_INT32_MAX, _INT64_MAX, _UINT64_MAX = 2**31 - 1, 2**63 - 1, 2**64 - 1
_RANGES = {  # PackageConfig field -> (option, least, most)
    "version": ("--model-version", 1, _INT64_MAX),  # version_policy.specific.versions: int64
    "max_batch_size": ("--max-batch-size", 1, _INT32_MAX),  # int32
    "instances": ("--instances", 1, _INT32_MAX),  # instance_group.count: int32
    "max_queue_delay_us": ("--max-queue-delay-us", 0, _UINT64_MAX),  # max_queue_delay_microseconds: uint64
    "replicas": ("--replicas", 1, _INT32_MAX),  # a Deployment's replicas: int32
}
# A KServe storageUri: a scheme (s3, gs, pvc, https, ...) and a path, with no spaces or control characters.
_STORAGE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\x00-\x20\x7f]+")

# ONNX TensorProto element type names -> Triton DataType names (model_config.proto).
_TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "DOUBLE": "TYPE_FP64", "BFLOAT16": "TYPE_BF16",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}


@dataclass
class PackageConfig:
    """How to package. ``name`` defaults to the manifest's model name (e.g. ``mlp``)."""

    name: str | None = None
    format: str = "onnx"
    version: int = 1
    max_batch_size: int = 256  # as serve's /predict/batch limit
    # Triton's default and its docs' starting point: no delay; requests that arrive while an
    # instance is busy still batch. Raise it only if a measurement says so.
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    instance_kind: str = "cpu"  # cpu | gpu | auto
    storage_uri: str = STORAGE_URI_PLACEHOLDER
    overwrite: bool = False
    # the Deployment of this server (deployment.yaml)
    image: str = IMAGE_PLACEHOLDER
    replicas: int = 1
    drain_timeout: float = 30.0  # serve's --drain-timeout; the pod's grace period is set above it


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton's TYPE_*
    dims: tuple[int, ...]  # without the batch axis; -1 where variable


@dataclass
class PackageResult:
    name: str
    version: int
    repository: Path
    config_path: Path
    model_path: Path
    inference_service_path: Path
    deployment_path: Path
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def onnx_tensor_specs(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs (initializers excluded) as Triton tensor specs, batch axis removed.

    Raises :class:`ExportError` when the file is not an ONNX model or its batch axis is fixed.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a broken file
        raise ExportError(f"{path}: not a readable ONNX model ({exc})") from None
    initializers = {t.name for t in model.graph.initializer}

    def specs(values) -> list[TensorSpec]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            tensor = v.type.tensor_type
            type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            if type_name not in _TRITON_TYPES:
                raise ExportError(f"{path}: tensor '{v.name}' has type {type_name}, which Triton does not take")
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
            if not dims or dims[0] != -1:
                raise ExportError(f"{path}: tensor '{v.name}' has a fixed batch axis {dims[:1]}; Triton's "
                                  "dynamic batching needs it dynamic (re-export with a dynamic batch)")
            out.append(TensorSpec(v.name, _TRITON_TYPES[type_name], tuple(dims[1:])))
        return out

    return specs(model.graph.input), specs(model.graph.output)


def _check_config(cfg: PackageConfig) -> None:
    if cfg.format not in ONNX_FORMATS:
        raise InputError(f"format '{cfg.format}' cannot be packaged for Triton's ONNX Runtime backend; "
                         f"choose one of {', '.join(ONNX_FORMATS)}")
    if cfg.name is not None and (not isinstance(cfg.name, str) or not _NAME.fullmatch(cfg.name)):
        raise InputError(f"model name '{cfg.name}' must be lowercase letters, digits and '-', 1-63 characters "
                         "(a Kubernetes object name; also the Triton model name)")
    for key, (option, least, most) in _RANGES.items():
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{option} must be an integer, got {value!r}")
        if value < least:
            raise InputError(f"{option} must be at least {least}, got {value}")
        if value > most:
            raise InputError(f"{option} {value} is out of range: Triton's config takes at most {most:,}")
    bad = [p for p in cfg.preferred_batch_sizes
           if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= cfg.max_batch_size]
    if bad:
        raise InputError(f"preferred batch sizes {bad} must lie in 1..{cfg.max_batch_size} (the max batch size)")
    if cfg.instance_kind not in INSTANCE_KINDS:
        raise InputError(f"instance kind '{cfg.instance_kind}' is not one of {', '.join(INSTANCE_KINDS)}")
    check_image(cfg.image)
    if isinstance(cfg.drain_timeout, bool) or not isinstance(cfg.drain_timeout, int | float) \
            or not 0.1 <= cfg.drain_timeout <= 3600:
        raise InputError(f"--drain-timeout must be a number of seconds in 0.1..3600, got {cfg.drain_timeout!r}")
    if not isinstance(cfg.storage_uri, str) or not _STORAGE_URI.fullmatch(cfg.storage_uri):
        raise InputError(f"--storage-uri {cfg.storage_uri!r} is not a storage URI (SCHEME://PATH, e.g. "
                         "s3://bucket/model_repository, with no spaces or control characters)")


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal: quoted, with quotes, backslashes and control characters
    escaped (tensor names come from the ONNX graph, which is data, not code)."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _pbtxt_tensors(key: str, specs: list[TensorSpec]) -> list[str]:
    lines = [f"{key} ["]
    for i, s in enumerate(specs):
        dims = ", ".join(str(d) for d in s.dims)
        lines += ["  {", f"    name: {_pbtxt_string(s.name)}", f"    data_type: {s.datatype}", f"    dims: [ {dims} ]",
                  "  }" + ("," if i < len(specs) - 1 else "")]
    return [*lines, "]"]


def triton_config(*, name: str, cfg: PackageConfig, inputs: list[TensorSpec], outputs: list[TensorSpec],
                  sha256: str, source: str) -> str:
    """config.pbtxt text (protobuf text format of Triton's ``inference.ModelConfig``)."""
    lines = [
        f"# Written by `mnist-deploy package` from {source}",
        f"# model file sha256 {sha256} (as in the manifest)",
        f"name: {_pbtxt_string(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {cfg.max_batch_size}",
        f"version_policy: {{ specific: {{ versions: [ {cfg.version} ] }} }}",
        *_pbtxt_tensors("input", inputs),
        *_pbtxt_tensors("output", outputs),
        "instance_group [",
        "  {",
        f"    count: {cfg.instances}",
        f"    kind: {INSTANCE_KINDS[cfg.instance_kind]}",
        "  }",
        "]",
        "dynamic_batching {",
    ]
    if cfg.preferred_batch_sizes:
        sizes = ", ".join(str(p) for p in sorted(set(cfg.preferred_batch_sizes)))
        lines.append(f"  preferred_batch_size: [ {sizes} ]")
    lines += [f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}", "}"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _staging(parent: Path):
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".package-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(stage: Path, model_dir: Path, final: Path, staged: dict[Path, Path]) -> None:
    """Move the staged model folder and YAML files (staged path -> final path) into place as one unit: if
    a YAML file cannot be moved, the model folder is put back as it was (none, or the previous one)."""
    old = None
    if final.exists():  # overwrite: swap the old folder out, the new one in, then drop the old
        old = stage / ".old"
        os.replace(final, old)
    try:
        os.replace(model_dir, final)
        try:
            for src, dst in staged.items():
                os.replace(src, dst)
        except BaseException:
            os.replace(final, stage / ".failed")  # removed with the staging folder
            raise
    except BaseException:
        if old is not None and not final.exists():  # the previous package, as it was
            os.replace(old, final)
        raise


def package_artifacts(*, artifacts: str | os.PathLike = "artifacts", out: str | os.PathLike = "package",
                      config: PackageConfig | None = None) -> PackageResult:
    """Write the Triton model repository and the KServe manifest for the ONNX export in ``artifacts``.

    Refuses (a typed error, nothing written) when the export is missing, failed, or its file does
    not match the manifest's sha256, and when the model folder exists and ``overwrite`` is not set.
    """
    cfg = config or PackageConfig()
    _check_config(cfg)
    folder, out = Path(artifacts), Path(out)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such artifacts folder; run `mnist-deploy train --out {folder}` first")
    manifest = load_manifest(folder)
    source = artifact_path(manifest, cfg.format, folder,
                           advice="; only an export that passed its parity gate is packaged")
    sha = manifest["artifacts"][cfg.format]["sha256"]
    name = cfg.name or str(manifest["model"]["name"]).lower().replace("_", "-")
    if not _NAME.fullmatch(name):
        raise InputError(f"the manifest's model name '{name}' is not a valid Kubernetes name; pass --name")

    inputs, outputs = onnx_tensor_specs(source)
    expected = tuple(int(d) for d in manifest["model"].get("input_shape") or ())
    if expected and [s.dims for s in inputs] != [expected]:
        raise ManifestError(f"{source}: ONNX inputs {[(s.name, s.dims) for s in inputs]} do not match the "
                            f"manifest's input shape {list(expected)}")

    repository = out / "model_repository"
    final = repository / name
    if final.exists() and not cfg.overwrite:
        raise InputError(f"{final} already exists; pass --overwrite to replace it")
    repository.mkdir(parents=True, exist_ok=True)
    isvc = out / "inferenceservice.yaml"
    # One unit: the model folder and the YAML are both written in the staging folder first, then moved
    # into place; if the YAML cannot be, the model folder is put back as it was (none, or the old one).
    with _staging(out) as stage:  # outside model_repository, where Triton would see a stray folder
        model_dir = stage / name
        model_path = model_dir / str(cfg.version) / "model.onnx"
        model_path.parent.mkdir(parents=True)
        shutil.copyfile(source, model_path)
        copied = sha256_file(model_path)
        if copied != sha:  # the file changed between the check and the copy
            raise IntegrityError(f"{source}: changed while being copied (sha256 {copied[:12]}... is not the "
                                 f"manifest's {sha[:12]}...); nothing was written")
        text = triton_config(name=name, cfg=cfg, inputs=inputs, outputs=outputs, sha256=sha,
                             source=f"{manifest_path(folder)} ({cfg.format})")
        (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
        staged = {stage / "inferenceservice.yaml": isvc, stage / "deployment.yaml": out / "deployment.yaml"}
        atomic_write_text(stage / "inferenceservice.yaml", inference_service(name=name, cfg=cfg))
        atomic_write_text(stage / "deployment.yaml", deployment(
            name=name, image=cfg.image, replicas=cfg.replicas, drain_timeout=cfg.drain_timeout, runtime=cfg.format))
        _commit(stage, model_dir, final, staged)
        fsync_dir(repository)
        fsync_dir(out)
    model_file = final / str(cfg.version) / "model.onnx"
    return PackageResult(name=name, version=cfg.version, repository=repository, config_path=final / "config.pbtxt",
                         model_path=model_file, inference_service_path=isvc,
                         deployment_path=out / "deployment.yaml", sha256=sha,
                         size_bytes=model_file.stat().st_size, inputs=inputs, outputs=outputs)
