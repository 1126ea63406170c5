"""Export a trained state_dict to every deployable format in the registry and prove, on the real test
set, that each artifact computes what the PyTorch model computes (the parity gate).

For every format: the model described by the manifest next to the checkpoint is rebuilt, the
format's exporter writes its files into a staging folder beside the output, those files are loaded
back in their own runtime and run on all 10,000 test images at batch size 1 and at batch size
10,000 (which also proves the dynamic batch axis). Only files that pass are moved into place and
recorded in ``manifest.json`` (every file with its sha256) with status ``ok``; a format that fails
parity (or whose exporter fails) is recorded as ``failed`` and its old files removed, so no consumer
picks it up. An I/O failure (a full disk) is not a verdict on the format: the previous artifact and
its manifest entry are kept, and the run reports the error.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..artifacts.files import atomic_write_bytes, atomic_write_json, pid_alive
from ..artifacts.manifest import STATE_DICT_NAME, artifact_entry, load_manifest, manifest_path, save_manifest
from ..errors import CheckpointError, ExportError, MnistDeployError, RuntimeUnavailable, first_line
from ..formats import FORMATS, ExportContext, Format, get_format, onnx_opset_range
from .parity import PARITY_BATCH_SIZES, ExportReport, FormatResult, parity_check
from .source import (
    DEFAULT_THRESHOLDS,
    ExportConfig,
    Source,
    artifact_metadata,
    load_eval_data,
    load_source,
    onnx_metadata,
    reference_logits,
)
from .verify import VerifyItem, VerifyReport, verify_artifacts

PARITY_NAME = "parity.json"
STAGING_PREFIX = ".export-"


# ---------------------------------------------------------------------------------------------
# Output folder and manifest bookkeeping.


def _prepare_output(out: Path, source: Source) -> dict:
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


def _commit_output(out: Path, manifest: dict, source: Source) -> None:
    """Write the state_dict copy (when ``out`` is a new folder) and the manifest, atomically."""
    out.mkdir(parents=True, exist_ok=True)
    if "state_dict" not in manifest["artifacts"]:
        target = out / STATE_DICT_NAME
        atomic_write_bytes(target, source.checkpoint.read_bytes())
        manifest["artifacts"]["state_dict"] = artifact_entry(target, format="state_dict",
                                                             copied_from=str(source.checkpoint))
    save_manifest(out, manifest)


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove what killed exports left behind: staging folders and temp files of processes that no
    longer run (a live concurrent export's are kept). Returns what was removed."""
    removed = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        pid = _temp_pid(p.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


def _temp_pid(name: str) -> int | None:
    """The pid in ``.export-<format>-<pid>.tmp`` (ours) or ``.<file>.<pid>.tmp<suffix>`` (older versions)."""
    if not name.startswith(".") or ".tmp" not in name:
        return None
    head = name[: name.rindex(".tmp")]
    tail = head.rsplit("-" if name.startswith(STAGING_PREFIX) else ".", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _write_parity(out: Path, report: ExportReport) -> Path:
    path = out / PARITY_NAME
    previous: dict = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and old.get("source_state_dict_sha256") == report.source_state_dict_sha256:
                previous = old.get("formats", {}) or {}
    formats = {**previous}
    for r in report.results:
        if r.status in ("ok", "failed"):
            formats[r.format] = {"file": r.file, "status": r.status, "size_bytes": r.size_bytes,
                                 "export_seconds": r.export_seconds, "error": r.error, "parity": r.parity}
    doc = {
        "created": _now(),
        "toolkit_version": __version__,
        "model": report.model,
        "source_state_dict_sha256": report.source_state_dict_sha256,
        "reference": "pytorch eager, fp32, CPU",
        "reference_accuracy": report.reference_accuracy,
        "test_images": report.test_images,
        "batch_sizes": sorted({min(b, report.test_images) for b in PARITY_BATCH_SIZES}),
        "formats": formats,
    }
    return atomic_write_json(path, doc)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")




# ---------------------------------------------------------------------------------------------
# The stage.


def export_artifacts(config: ExportConfig | None = None, *, artifacts="artifacts", checkpoint=None, data_dir=None,
                     cache_dir=None, allow_download: bool = True, progress=None, **settings) -> ExportReport:
    """Export the state_dict to ``config.formats`` (default: every exportable format) in ``artifacts``
    and gate each on parity.

    ``config`` (:class:`ExportConfig`) says what to export and how it is judged; callers from before
    it may pass its fields and the format options as keywords instead (``formats=["onnx"]``,
    ``atol=1e-5``, ``parity_images=1000``, ``opset=18``, ``torchscript_method="trace"``...: the fields
    of the registry's option dataclasses, defaults there), never both. ``checkpoint`` defaults to
    ``artifacts/mnist_model_state_dict.pth``; the manifest next to it says which model to rebuild.
    Thresholds left None are each format's own. Bad input raises before anything is written. A
    format named explicitly that cannot run here raises; under "all" it is skipped. A format that
    fails does not stop the others; check ``report.ok``. ``progress(name)`` is called before each
    format (the CLI prints a line).
    """
    if config is not None and settings:
        raise TypeError(f"pass either an ExportConfig or its fields as keywords, not both ({', '.join(settings)})")
    config = config or ExportConfig.from_arguments(**settings)
    unavailable = _check_formats(config)
    out = Path(artifacts)
    source = load_source(Path(checkpoint) if checkpoint else out / STATE_DICT_NAME)
    manifest = _prepare_output(out, source)
    data = load_eval_data(source.manifest, data_dir, cache_dir, allow_download).head(config.parity_images)
    reference = reference_logits(source.model, data.images)
    reference_accuracy = float((reference.argmax(1) == data.labels).mean())
    clean_stale_temps(out)
    _commit_output(out, manifest, source)  # every check on the input has passed: now we may write

    import torch

    ctx = ExportContext(example=torch.from_numpy(data.images[:2].copy()),
                        metadata=artifact_metadata(source.manifest, source.sha256), calibration=data.calibration,
                        tuning=data.tuning)
    report = ExportReport(out, source.sha256, source.manifest["model"]["name"], reference_accuracy,
                          test_images=len(data.labels))
    for name in config.selected():
        fmt = get_format(name)
        if name in unavailable:
            report.results.append(FormatResult(name, fmt.files[0], "skipped", error=unavailable[name]))
            continue
        if progress is not None:
            progress(name)
        report.results.append(_export_one(fmt, source, ctx, config, out, manifest, data, reference,
                                          reference_accuracy))
    if config.parity:
        try:
            report.parity_path = _write_parity(out, report)
        except OSError as exc:
            raise ExportError(f"{out / PARITY_NAME}: cannot write the parity report: {exc.strerror or exc}") from None
    return report


def _check_formats(config: ExportConfig) -> dict[str, str]:
    """Validate ``config``; return {format: why it cannot run here} for the formats to skip. A format
    named explicitly that cannot run here, or one with nothing to export, raises."""
    config.validate()
    unavailable = {}
    for name in config.selected():
        fmt = get_format(name)
        if not fmt.exportable:
            raise ExportError(f"'{name}' runs the state_dict itself; there is nothing to export")
        reason = fmt.unavailable("cpu")
        if reason and config.explicit:
            raise RuntimeUnavailable(f"cannot export {name}: {reason}")
        if reason:
            unavailable[name] = reason
    return unavailable


def _export_one(fmt: Format, source: Source, ctx: ExportContext, config: ExportConfig, out: Path, manifest: dict,
                data, reference: np.ndarray, reference_accuracy: float) -> FormatResult:
    staging = out / f"{STAGING_PREFIX}{fmt.name}-{os.getpid()}.tmp"
    options = config.format_options(fmt)
    result = FormatResult(fmt.name, fmt.files[0], "failed")
    base = {"format": fmt.name, "runtime": fmt.runtime, "source_state_dict_sha256": source.sha256,
            "options": _plain(options), "toolkit_version": __version__, "created": _now()}
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        ctx.workdir = staging
        ctx.criteria, ctx.notes = config.criteria(fmt), {}
        staged = [staging / f for f in fmt.files]
        t0 = time.perf_counter()
        _run_exporter(fmt, source, staged, options, ctx)
        result.export_seconds = time.perf_counter() - t0
        base.update(ctx.notes)  # what the exporter recorded (AOTI: compiler, target ISA; INT8: the ladder, 8-bit path)
        result.notes = dict(ctx.notes)
        result.size_bytes = sum(p.stat().st_size for p in staged)
        result.parity = _gate(fmt, staged[0], source, config, data, reference, reference_accuracy)
        if result.parity.get("passed") is False:
            result.error = "; ".join(result.parity["reasons"])
        if result.error is None:
            entry = _install(fmt, staged, out, manifest, base, result)
            result.status, result.sha256 = "ok", entry["sha256"]
            ctx.passed[fmt.name] = out / fmt.files[0]
            return result
    except OSError as exc:
        # Not a verdict on the format: the previous artifact and its entry stay as they were.
        where = f"{exc.filename}: " if exc.filename else ""
        result.status = "error"
        result.error = f"I/O error, previous artifact kept: {where}{exc.strerror or exc}"
        return result
    except MnistDeployError as exc:
        result.error = str(exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _record_failure(fmt, out, manifest, base, result)
    return result


def _run_exporter(fmt: Format, source: Source, staged: list[Path], options, ctx: ExportContext) -> None:
    """Write ``fmt``'s files into the staging folder; any exporter error becomes one :class:`ExportError`."""
    try:
        fmt.export(copy.deepcopy(source.model).eval(), staged[0], options, ctx)
    except OSError:
        raise
    except Exception as exc:  # exporters raise many types; the first line says what failed
        _raise_if_disk_full(staged[0].parent)  # some runtimes report a full disk as their own error type
        if isinstance(exc, MnistDeployError):
            raise
        raise ExportError(f"{fmt.name} export failed: {first_line(exc)}") from None
    missing = [p.name for p in staged if not p.is_file()]
    if missing:
        raise ExportError(f"{fmt.name}: the exporter did not write {', '.join(missing)}")


def _gate(fmt: Format, path: Path, source: Source, config: ExportConfig, data, reference: np.ndarray,
          reference_accuracy: float) -> dict:
    """The parity verdict on the staged file, loaded back in its own runtime (or "skipped")."""
    criteria = config.criteria(fmt)
    if not config.parity:
        return {"passed": None, "skipped": True, "criteria": criteria}
    from ..formats import load_predictor

    predictor = load_predictor(fmt.name, path, manifest=source.manifest)
    parity = parity_check(predictor, reference, data.images, data.labels, criteria, reference_accuracy)
    parity["applied"] = dict(getattr(predictor, "details", {}) or {})
    return parity


def _record_failure(fmt: Format, out: Path, manifest: dict, base: dict, result: FormatResult) -> None:
    """Failed: the files never take the deployable names, and stale ones from an earlier export go too."""
    for name in fmt.files:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    with contextlib.suppress(OSError):
        _record(out, manifest, fmt.name, {"path": fmt.files[0], "sha256": None, "size_bytes": None,
                                          "status": "failed", **base, "export_seconds": result.export_seconds,
                                          "parity": result.parity, "error": result.error})


def _raise_if_disk_full(folder: Path, probe_bytes: int = 1 << 20) -> None:
    """Raise the OSError a write of ``probe_bytes`` into ``folder`` meets (ENOSPC, EFBIG, EDQUOT), if any."""
    probe = folder / ".space-probe"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * probe_bytes)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _install(fmt: Format, staged: list[Path], out: Path, manifest: dict, base: dict, result: FormatResult) -> dict:
    """Move the staged files into place and record them; on an I/O failure put the old files back."""
    for p in staged:
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())
    backup = staged[0].parent / "previous"
    backup.mkdir()
    finals = [out / p.name for p in staged]
    kept = []
    for final in finals:
        if final.is_file():
            os.link(final, backup / final.name)  # a second name for the old file: costs no space
            kept.append(final)
    try:
        for p, final in zip(staged, finals, strict=True):
            os.replace(p, final)
        entry = artifact_entry(*finals, status="ok", **base, export_seconds=result.export_seconds,
                               parity=result.parity)
        _record(out, manifest, fmt.name, entry)
    except BaseException:
        for final in finals:
            if final in kept:
                os.replace(backup / final.name, final)
            else:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
        raise
    return entry


def _record(out: Path, manifest: dict, key: str, entry: dict) -> None:
    previous = manifest["artifacts"].get(key)
    manifest["artifacts"][key] = entry
    try:
        save_manifest(out, manifest)
    except BaseException:
        if previous is None:
            manifest["artifacts"].pop(key, None)
        else:
            manifest["artifacts"][key] = previous
        raise


def _plain(options) -> dict:
    from dataclasses import asdict

    return asdict(options)


__all__ = [
    "DEFAULT_THRESHOLDS", "ExportConfig", "FORMATS", "VerifyItem", "VerifyReport", "clean_stale_temps",
    "export_artifacts", "onnx_metadata", "onnx_opset_range", "verify_artifacts",
]
