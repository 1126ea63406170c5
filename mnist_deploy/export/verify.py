"""Verify: re-check what the manifest vouches for, with the same parity gate export used."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..artifacts.manifest import load_manifest, verified_path
from ..errors import IntegrityError, MnistDeployError
from ..formats import FORMATS, artifact_path, entry_usable, load_predictor, model_from_state_dict
from .parity import parity_check
from .source import ExportConfig, load_eval_data, reference_logits


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


def _exported(key: str) -> bool:
    fmt = FORMATS.get(key)
    return fmt is not None and fmt.exportable


def verify_artifacts(*, artifacts="artifacts", data_dir=None, cache_dir=None, allow_download: bool = True,
                     progress=None) -> VerifyReport:
    """Re-check every artifact in ``artifacts/manifest.json``.

    Every entry: every file exists and its sha256 is the recorded one. Every exported format, in
    addition: recorded as ok, made from the recorded state_dict, its format's own checks (the ONNX
    checker and metadata, for one), loads in its runtime, and still passes the parity gate it was
    exported under, on all 10,000 test images at batch sizes 1 and 10,000. Returns a report;
    ``report.ok`` is False when anything failed.
    """
    out = Path(artifacts)
    manifest = load_manifest(out)
    entries = manifest.get("artifacts", {})
    report = VerifyReport(out)
    for key, entry in entries.items():
        if _exported(key):
            continue
        item = VerifyItem(key, str(entry.get("format", "")), entry.get("path"), True)
        try:
            verified_path(out, key, manifest)
            item.checks.append("sha256")
        except MnistDeployError as exc:
            item.ok = False
            item.problems.append(str(exc))
        report.items.append(item)
    formats = [k for k in entries if _exported(k)]
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
    data = load_eval_data(manifest, data_dir, cache_dir, allow_download)
    reference = reference_logits(model, data.images)
    reference_accuracy = float((reference.argmax(1) == data.labels).mean())
    for key in formats:
        if progress is not None:
            progress(key)
        report.items.append(_verify_one(out, key, entries[key], manifest, sd_sha, data, reference,
                                        reference_accuracy))
    return report


def _verify_one(out: Path, key: str, entry: dict, manifest: dict, sd_sha: str, data, reference,
                reference_accuracy: float) -> VerifyItem:
    fmt = FORMATS[key]
    item = VerifyItem(key, key, entry.get("path"), False)
    if not entry_usable(entry):  # formats decides what a usable entry is, for every stage
        item.problems.append(f"recorded as {entry.get('status')!r} at export: {entry.get('error') or 'no detail'}")
        return item
    try:
        path = artifact_path(manifest, key, out)
        item.checks.append("sha256" if not entry.get("files") else f"sha256 of {len(entry['files'])} files")
        if entry.get("source_state_dict_sha256") != sd_sha:
            raise IntegrityError(f"{path}: exported from another state_dict than the one in the manifest")
        if fmt.check is not None:
            fmt.check(path, entry)
            item.checks.append(f"{fmt.name} checks")
        unavailable = fmt.unavailable("cpu")
        if unavailable:
            item.problems.append(f"cannot load it here: {unavailable}")
            item.ok = False
            return item
        predictor = load_predictor(key, path, manifest=manifest)
        item.checks.append(f"loads in {fmt.runtime}")
        criteria = (entry.get("parity") or {}).get("criteria") or ExportConfig().criteria(fmt)
        item.parity = parity_check(predictor, reference, data.images, data.labels, criteria, reference_accuracy)
        if item.parity["passed"]:
            item.checks.append("parity")
        else:
            item.problems.append("parity failed: " + "; ".join(item.parity["reasons"]) + _int8_context(entry))
    except MnistDeployError as exc:
        item.problems.append(str(exc))
    item.ok = not item.problems
    return item


def _int8_context(entry: dict) -> str:
    """For an INT8 artifact that passed at export and fails here: say so, and name both CPUs' 8-bit paths
    (a file quantized with 8-bit weights predicts differently where ``vpmaddubsw`` saturates)."""
    recorded = (entry.get("int8") or {}).get("cpu_int8_path")
    if recorded is None or not (entry.get("parity") or {}).get("passed"):
        return ""
    from ..formats.cpu_int8 import describe, int8_path

    here = int8_path()
    at = (entry.get("parity") or {}).get("agreement")
    passed = f"it passed at export (agreement {100 * at:.2f}%)" if at is not None else "it passed at export"
    same = "the same path" if here.get("path") == recorded.get("path") else "another path"
    return (f". INT8 results depend on the CPU's 8-bit arithmetic: {passed} on a CPU whose 8-bit path is "
            f"{describe(recorded)}; this CPU's is {describe(here)} ({same})")


__all__ = ["VerifyItem", "VerifyReport", "verify_artifacts"]
