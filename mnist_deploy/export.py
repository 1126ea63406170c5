"""Export a trained state_dict to every deployable format and prove, on the real test set, that each
artifact computes what the PyTorch model computes (the parity gate); re-check it later (verify).

For every format: the model described by the manifest next to the checkpoint is rebuilt, the
exporter from :data:`formats.FORMATS` writes a temporary file in the output folder, that file is
loaded back in its own runtime and run on all 10,000 test images at batch size 1 and at batch size
10,000 (which also proves the dynamic batch axis). Only a file that passes is renamed into place
and recorded in ``manifest.json`` with status ``ok``; a failing one is deleted and recorded as
``failed`` with its parity numbers, so no consumer ever picks it up.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .artifacts import (
    STATE_DICT_NAME,
    artifact_entry,
    atomic_write_bytes,
    atomic_write_json,
    load_manifest,
    manifest_path,
    save_manifest,
    sha256_file,
    verified_path,
)
from .errors import CheckpointError, ExportError, InputError, IntegrityError, MnistDeployError
from .parity import PARITY_BATCH_SIZES, ExportReport, FormatResult, parity_check

PARITY_NAME = "parity.json"
CLASS_LABELS = [str(i) for i in range(10)]
TORCHSCRIPT_METHODS = ("trace", "script")
ONNX_EXPORTERS = ("dynamo", "legacy")
QUANTIZATIONS = ("static", "dynamic")


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class ExportConfig:
    """Everything that decides an export run and its parity gate; saved with every artifact."""

    formats: tuple[str, ...] = ()  # empty: every format in the registry
    opset: int = 18
    atol: float = 1e-4
    rtol: float = 0.0
    min_agreement: float = 1.0
    int8_min_agreement: float = 0.995
    int8_max_accuracy_drop: float = 0.003  # a fraction: 0.003 is 0.3 percentage points
    torchscript_method: str = "trace"
    onnx_exporter: str = "dynamo"
    quantization: str = "static"
    calibration_size: int = 500
    parity: bool = True

    def validate(self) -> None:
        from .formats import get_format

        for name in self.formats:
            get_format(name)
        for label, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if not (np.isfinite(value) and value >= 0):
                raise InputError(f"{label} must be a finite number >= 0, got {value}")
        for label, value in (("--min-agreement", self.min_agreement),
                             ("--int8-min-agreement", self.int8_min_agreement),
                             ("--int8-max-accuracy-drop", self.int8_max_accuracy_drop)):
            if not (0.0 <= value <= 1.0):
                raise InputError(f"{label} is a fraction between 0 and 1, got {value}")
        if self.torchscript_method not in TORCHSCRIPT_METHODS:
            raise InputError(f"unknown TorchScript method '{self.torchscript_method}'; choose trace or script")
        if self.onnx_exporter not in ONNX_EXPORTERS:
            raise InputError(f"unknown ONNX exporter '{self.onnx_exporter}'; choose dynamo or legacy")
        if self.quantization not in QUANTIZATIONS:
            raise InputError(f"unknown quantization '{self.quantization}'; choose static or dynamic")
        if self.calibration_size < 1:
            raise InputError(f"--calibration-size must be at least 1, got {self.calibration_size}")
        if any(n in ("onnx", "onnx-int8") for n in self.formats):
            lo, hi = onnx_opset_range(self.onnx_exporter)
            if not (lo <= self.opset <= hi):
                other = "legacy" if self.onnx_exporter == "dynamo" else "dynamo"
                olo, ohi = onnx_opset_range(other)
                hint = f"; the {other} exporter writes {olo}-{ohi} (--onnx-exporter {other})" if olo <= self.opset <= ohi else ""
                raise ExportError(
                    f"--opset {self.opset}: the {self.onnx_exporter} ONNX exporter writes opsets {lo}-{hi}{hint}"
                )

    def criteria(self, parity_kind: str) -> dict:
        if parity_kind == "predictions":
            return {"kind": "predictions", "min_agreement": self.int8_min_agreement,
                    "max_accuracy_drop": self.int8_max_accuracy_drop}
        return {"kind": "logits", "atol": self.atol, "rtol": self.rtol, "min_agreement": self.min_agreement}

    def options(self, name: str) -> dict:
        """The options that shaped format ``name`` (what goes into its manifest entry)."""
        if name == "torchscript":
            return {"torchscript_method": self.torchscript_method}
        if name == "onnx":
            return {"opset": self.opset, "onnx_exporter": self.onnx_exporter}
        if name == "onnx-int8":
            out = {"opset": self.opset, "onnx_exporter": self.onnx_exporter, "quantization": self.quantization}
            if self.quantization == "static":
                out["calibration_size"] = self.calibration_size
            return out
        return {}


def onnx_opset_range(exporter: str) -> tuple[int, int]:
    """The ONNX opsets ``exporter`` writes as asked (anything else it silently rewrites or rejects).

    The torch.export-based exporter builds opset 18+ natively (below that it tries a version
    converter that can silently fall back to 18); the TorchScript-based one supports 7 to 20.
    """
    if exporter == "legacy":
        return 7, 20
    import onnx

    return 18, int(onnx.defs.onnx_opset_version())


# ---------------------------------------------------------------------------------------------
# Shared setup: the model, its reference logits, the data.


@dataclass
class _Source:
    model: Any
    manifest: dict
    checkpoint: Path
    sha256: str


def _load_source(checkpoint: Path) -> _Source:
    from .formats import model_from_state_dict

    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file; run `mnist-deploy train` first")
    manifest = load_manifest(checkpoint.parent)
    name = manifest["model"]["name"]
    model = model_from_state_dict(manifest, checkpoint, f"{checkpoint} (manifest says model '{name}')")
    return _Source(model, manifest, checkpoint, sha256_file(checkpoint))


def _test_data(manifest: dict, data_dir, cache_dir, allow_download: bool, calibration_size: int = 0):
    from .data import load_splits

    splits, _ = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    shape = tuple(manifest["model"].get("input_shape") or (784,))
    test = splits["test"]
    images = test.images.numpy().reshape(len(test), *shape).astype(np.float32, copy=False)
    labels = test.labels.numpy()
    calibration = None
    if calibration_size:
        train = splits["train"].images.numpy()
        idx = np.random.default_rng(0).choice(len(train), size=min(calibration_size, len(train)), replace=False)
        calibration = np.ascontiguousarray(train[np.sort(idx)].reshape(-1, *shape), dtype=np.float32)
    return np.ascontiguousarray(images), labels, calibration


def _reference_logits(model, images: np.ndarray) -> np.ndarray:
    from .formats import load_eager

    return load_eager(model)(images)


def onnx_metadata(manifest: dict, source_sha256: str) -> dict[str, str]:
    """What an ONNX consumer needs to feed the model (written as the model's metadata_props)."""
    pre = manifest.get("preprocessing", {})
    model = manifest["model"]
    return {
        "model_name": str(model["name"]),
        "model_hparams": json.dumps(model.get("hparams", {}), sort_keys=True),
        "input_name": "input",
        "output_name": "logits",
        "input_shape": json.dumps(["batch", *model.get("input_shape", [784])]),
        "input_layout": str(pre.get("layout", "")),
        "preprocessing": "x = (pixel / 255 - mean) / std",
        "preprocessing_scale": repr(float(pre.get("scale", 1 / 255))),
        "preprocessing_mean": repr(float(pre.get("mean", 0.1307))),
        "preprocessing_std": repr(float(pre.get("std", 0.3081))),
        "class_labels": json.dumps(CLASS_LABELS),
        "source_state_dict_sha256": source_sha256,
        "toolkit": "mnist-deploy",
        "toolkit_version": __version__,
    }


# ---------------------------------------------------------------------------------------------
# Output folder and manifest bookkeeping.


def _prepare_output(out: Path, source: _Source) -> dict:
    """The manifest export will extend in ``out``; makes ``out`` self-contained when it is not the
    checkpoint's folder (copies the state_dict and the training manifest). Raises before writing
    anything when the checkpoint is not the state_dict ``out``'s manifest describes."""
    same = out.resolve() == source.checkpoint.parent.resolve()
    if same:
        manifest = source.manifest
        entry = manifest["artifacts"].get("state_dict")
        if entry is not None and entry.get("sha256") != source.sha256:
            raise CheckpointError(
                f"{source.checkpoint}: sha256 {source.sha256[:12]}... is not the state_dict recorded in "
                f"{manifest_path(out)} ({entry.get('path')}, {str(entry.get('sha256'))[:12]}...); "
                "export it into another --out folder or retrain"
            )
        if entry is None:
            manifest["artifacts"]["state_dict"] = artifact_entry(source.checkpoint, format="state_dict")
        return manifest
    existing = load_manifest(out, required=False) if manifest_path(out).is_file() else None
    if existing and existing.get("artifacts", {}).get("state_dict", {}).get("sha256") == source.sha256 \
            and (out / existing["artifacts"]["state_dict"]["path"]).is_file():
        return existing
    return {**copy.deepcopy({k: v for k, v in source.manifest.items() if k != "artifacts"}), "artifacts": {}}


def _commit_output(out: Path, manifest: dict, source: _Source) -> None:
    """Write the state_dict copy (when ``out`` is a new folder) and the manifest, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    if "state_dict" not in manifest["artifacts"]:
        target = out / STATE_DICT_NAME
        atomic_write_bytes(target, source.checkpoint.read_bytes())
        manifest["artifacts"]["state_dict"] = artifact_entry(target, format="state_dict",
                                                             copied_from=str(source.checkpoint))
    save_manifest(out, manifest)


def _record(out: Path, manifest: dict, key: str, entry: dict) -> None:
    manifest["artifacts"][key] = entry
    save_manifest(out, manifest)


def _write_parity(out: Path, report: ExportReport, config: ExportConfig) -> Path:
    path = out / PARITY_NAME
    previous: dict = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and old.get("source_state_dict_sha256") == report.source_state_dict_sha256:
                previous = old.get("formats", {}) or {}
    formats = {**previous}
    for r in report.results:
        formats[r.format] = {"file": r.file, "status": r.status, "size_bytes": r.size_bytes,
                             "export_seconds": r.export_seconds, "error": r.error, "parity": r.parity}
    doc = {
        "created": _now(),
        "toolkit_version": __version__,
        "model": report.model,
        "source_state_dict_sha256": report.source_state_dict_sha256,
        "reference": "pytorch eager, fp32, CPU",
        "reference_accuracy": report.reference_accuracy,
        "test_images": 10_000,
        "batch_sizes": list(PARITY_BATCH_SIZES),
        "formats": formats,
    }
    return atomic_write_json(path, doc)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The stage.


def export_artifacts(*, artifacts="artifacts", checkpoint=None, formats=None, opset: int = 18,
                     atol: float = 1e-4, rtol: float = 0.0, min_agreement: float = 1.0,
                     int8_min_agreement: float = 0.995, int8_max_accuracy_drop: float = 0.003,
                     torchscript_method: str = "trace", onnx_exporter: str = "dynamo",
                     quantization: str = "static", calibration_size: int = 500, parity: bool = True,
                     data_dir=None, cache_dir=None, allow_download: bool = True, progress=None) -> ExportReport:
    """Export the state_dict to ``formats`` (default: all) in ``artifacts`` and gate each on parity.

    ``checkpoint`` defaults to ``artifacts/mnist_model_state_dict.pth``; the manifest next to it
    says which model to rebuild. Bad input (checkpoint, manifest, format name, opset, thresholds)
    raises before anything is written. A format that fails to export or fails parity does not stop
    the others: it is recorded as ``failed`` and its file removed; check ``report.ok``.
    ``progress(name)`` is called before each format (the CLI prints a line).
    """
    from .formats import FORMATS, ExportContext, get_format

    names = tuple(FORMATS) if not formats or "all" in formats else tuple(dict.fromkeys(formats))
    config = ExportConfig(formats=names, opset=opset, atol=atol, rtol=rtol, min_agreement=min_agreement,
                          int8_min_agreement=int8_min_agreement, int8_max_accuracy_drop=int8_max_accuracy_drop,
                          torchscript_method=torchscript_method, onnx_exporter=onnx_exporter,
                          quantization=quantization, calibration_size=calibration_size, parity=parity)
    config.validate()
    out = Path(artifacts)
    checkpoint = Path(checkpoint) if checkpoint else out / STATE_DICT_NAME
    source = _load_source(checkpoint)
    manifest = _prepare_output(out, source)
    needs_calibration = "onnx-int8" in names and quantization == "static"
    images, labels, calibration = _test_data(source.manifest, data_dir, cache_dir, allow_download,
                                             calibration_size if needs_calibration else 0)
    reference = _reference_logits(source.model, images)
    reference_accuracy = float((reference.argmax(1) == labels).mean())
    _commit_output(out, manifest, source)  # every check on the input has passed: now we may write

    import torch

    ctx = ExportContext(example=torch.from_numpy(images[:2].copy()), opset=opset,
                        torchscript_method=torchscript_method, onnx_exporter=onnx_exporter,
                        quantization=quantization, calibration=calibration,
                        metadata=onnx_metadata(source.manifest, source.sha256), workdir=out)
    report = ExportReport(out, source.sha256, source.manifest["model"]["name"], reference_accuracy)
    for name in names:
        fmt = get_format(name)
        if progress is not None:
            progress(name)
        result = _export_one(fmt, source, ctx, config, out, manifest, images, labels, reference,
                             reference_accuracy)
        report.results.append(result)
    if parity:
        report.parity_path = _write_parity(out, report, config)
    return report


def _export_one(fmt, source: _Source, ctx, config: ExportConfig, out: Path, manifest: dict,
                images: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                reference_accuracy: float) -> FormatResult:
    final = out / fmt.filename
    tmp = out / f".{fmt.filename}.{os.getpid()}.tmp{final.suffix}"
    criteria = config.criteria(fmt.parity)
    result = FormatResult(fmt.name, fmt.filename, "failed")
    base = {"format": fmt.name, "runtime": fmt.runtime, "source_state_dict_sha256": source.sha256,
            "options": config.options(fmt.name), "toolkit_version": __version__, "created": _now()}
    try:
        t0 = time.perf_counter()
        try:
            fmt.export(copy.deepcopy(source.model).eval(), tmp, ctx)
        except MnistDeployError:
            raise
        except Exception as exc:  # exporters raise many types; the first line says what failed
            raise ExportError(f"{fmt.name} export failed: {_first_line(exc)}") from None
        result.export_seconds = time.perf_counter() - t0
        result.size_bytes = tmp.stat().st_size
        if config.parity:
            try:
                predictor = fmt.load(tmp)
            except MnistDeployError:
                raise
            except Exception as exc:  # torch.jit.load / torch.export.load raise RuntimeError and friends
                raise ExportError(f"{fmt.name}: the exported file does not load in {fmt.runtime}: "
                                  f"{_first_line(exc)}") from None
            result.parity = parity_check(predictor, reference, images, labels, criteria, reference_accuracy)
            del predictor
        else:
            result.parity = {"passed": None, "skipped": True, "criteria": criteria}
        if result.parity.get("passed") is False:
            result.error = "; ".join(result.parity["reasons"])
    except MnistDeployError as exc:
        result.error = str(exc)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if result.error is None:
        _fsync(tmp)
        os.replace(tmp, final)
        entry = artifact_entry(final, status="ok", **base, export_seconds=result.export_seconds,
                               parity=result.parity)
        result.status, result.sha256 = "ok", entry["sha256"]
        _record(out, manifest, fmt.name, entry)
        if fmt.name == "onnx":
            ctx.onnx_fp32 = final  # INT8 quantizes the fp32 model that just passed, instead of re-exporting
        return result
    # Failed: the file never takes the deployable name, and a stale one from an earlier export goes too.
    for p in (tmp, final):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    _record(out, manifest, fmt.name, {"path": fmt.filename, "sha256": None, "size_bytes": None, "status": "failed",
                                      **base, "export_seconds": result.export_seconds, "parity": result.parity,
                                      "error": result.error})
    return result


# ---------------------------------------------------------------------------------------------
# Verify: re-check what the manifest vouches for.


@dataclass
class VerifyItem:
    key: str
    format: str
    path: str | None
    ok: bool
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    parity: dict | None = None


@dataclass
class VerifyReport:
    artifacts: Path
    items: list[VerifyItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.items)

    @property
    def problems(self) -> list[str]:
        return [f"{i.key}: {p}" for i in self.items for p in i.problems]

    def to_dict(self) -> dict:
        return {"artifacts": str(self.artifacts), "ok": self.ok, "items": [asdict(i) for i in self.items]}


def verify_artifacts(*, artifacts="artifacts", data_dir=None, cache_dir=None, allow_download: bool = True,
                     progress=None) -> VerifyReport:
    """Re-check every artifact in ``artifacts/manifest.json``.

    Every entry: the file exists and its sha256 is the recorded one. Every exported format, in
    addition: recorded as ok, made from the recorded state_dict, valid (ONNX checker), loads in its
    runtime, and still passes the parity gate it was exported under, on all 10,000 test images at
    batch sizes 1 and 10,000. Returns a report; ``report.ok`` is False when anything failed.
    """
    from .formats import FORMATS, model_from_state_dict

    out = Path(artifacts)
    manifest = load_manifest(out)
    entries = manifest.get("artifacts", {})
    report = VerifyReport(out)
    for key, entry in entries.items():
        if key in FORMATS:
            continue
        item = VerifyItem(key, str(entry.get("format", "")), entry.get("path"), True)
        try:
            verified_path(out, key, manifest)
            item.checks.append("sha256")
        except MnistDeployError as exc:
            item.ok = False
            item.problems.append(str(exc))
        report.items.append(item)
    formats = [k for k in entries if k in FORMATS]
    if not formats:
        return report

    sd_item = next((i for i in report.items if i.key == "state_dict"), None)
    if sd_item is None or not sd_item.ok:
        for key in formats:
            report.items.append(VerifyItem(key, key, entries[key].get("path"), False,
                                           problems=["cannot check parity: the state_dict is missing or changed"]))
        return report
    sd_path = verified_path(out, "state_dict", manifest)
    sd_sha = entries["state_dict"]["sha256"]
    model = model_from_state_dict(manifest, sd_path)
    images, labels, _ = _test_data(manifest, data_dir, cache_dir, allow_download)
    reference = _reference_logits(model, images)
    reference_accuracy = float((reference.argmax(1) == labels).mean())
    for key in formats:
        if progress is not None:
            progress(key)
        report.items.append(_verify_one(out, key, entries[key], manifest, sd_sha, images, labels, reference,
                                        reference_accuracy))
    return report


def _verify_one(out: Path, key: str, entry: dict, manifest: dict, sd_sha: str, images, labels, reference,
                reference_accuracy: float) -> VerifyItem:
    from .formats import check_onnx, get_format

    fmt = get_format(key)
    item = VerifyItem(key, key, entry.get("path"), False)
    if entry.get("status") != "ok":
        item.problems.append(f"recorded as {entry.get('status')!r} at export: {entry.get('error') or 'no detail'}")
        return item
    try:
        path = verified_path(out, key, manifest)
        item.checks.append("sha256")
        if entry.get("source_state_dict_sha256") != sd_sha:
            raise IntegrityError(f"{path}: exported from another state_dict than the one in the manifest")
        if fmt.runtime.startswith("onnxruntime"):
            check_onnx(path)
            _check_onnx_metadata(path, sd_sha)
            item.checks.append("onnx checker + metadata")
        predictor = fmt.load(path)
        item.checks.append(f"loads in {fmt.runtime}")
        criteria = (entry.get("parity") or {}).get("criteria") or ExportConfig().criteria(fmt.parity)
        item.parity = parity_check(predictor, reference, images, labels, criteria, reference_accuracy)
        if item.parity["passed"]:
            item.checks.append("parity")
        else:
            item.problems.append("parity failed: " + "; ".join(item.parity["reasons"]))
    except MnistDeployError as exc:
        item.problems.append(str(exc))
    item.ok = not item.problems
    return item


def _check_onnx_metadata(path: Path, sd_sha: str) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if props.get("source_state_dict_sha256") != sd_sha:
        raise IntegrityError(f"{path}: its metadata names another source state_dict "
                             f"({str(props.get('source_state_dict_sha256'))[:12]}...)")


__all__ = [
    "ExportConfig",
    "VerifyItem",
    "VerifyReport",
    "export_artifacts",
    "onnx_metadata",
    "onnx_opset_range",
    "verify_artifacts",
]
