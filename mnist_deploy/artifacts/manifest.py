"""The manifest: one JSON file per artifacts folder that says how every artifact in it was made,
its shape checked on load, and files resolved through it after their sha256 is checked."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, ManifestError
from .files import atomic_write_json, sha256_file

MANIFEST_NAME = "manifest.json"
STATE_DICT_NAME = "mnist_model_state_dict.pth"

# ---------------------------------------------------------------------------------------------
# Manifest: one JSON file per artifacts folder that says how every artifact in it was made.


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST_NAME


def load_manifest(folder: str | os.PathLike, *, required: bool = True, need_model: bool | None = None) -> dict:
    """Read ``folder/manifest.json``; an empty manifest when absent and not ``required``.

    ``need_model`` (default: ``required``) also demands the trained model's entry (``model.name``),
    which every stage that rebuilds or describes the model needs.
    """
    path = manifest_path(folder)
    _finish_interrupted_train(Path(folder))
    if not path.is_file():
        if required:
            raise ManifestError(f"{path}: no manifest; run `mnist-deploy train --out {Path(folder)}` first")
        return {"artifacts": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object")
    data.setdefault("artifacts", {})
    if (required if need_model is None else need_model) and "model" not in data:
        raise ManifestError(f"{path}: has no model entry; run `mnist-deploy train` first")
    _check_manifest(data, path)
    return data


def _finish_interrupted_train(folder: Path) -> None:
    """A train killed inside its in-place commit (the fallback where folders cannot be exchanged)
    leaves a journal of the new set: every reader rolls it forward first, so it sees one whole set."""
    from .commit import JOURNAL, finish_pending_commit

    if not (folder / JOURNAL).is_dir():
        return
    try:
        finish_pending_commit(folder)
    except OSError as exc:
        raise ManifestError(f"{folder}: an interrupted train left its new artifacts in {JOURNAL}/ and they "
                            f"cannot be moved into place ({exc.strerror}); fix that, or train again") from None


# The manifest's shape, checked once on load so that every reader can index it without a traceback.
# A field of the wrong type is one ManifestError naming it (``artifacts.onnx.path must be ...``).

_SHA256 = re.compile(r"[0-9a-f]{64}")
IMAGE_SIZE = 28 * 28  # every model here takes one MNIST image, however it is shaped
MAX_WIDTH = 1 << 16  # a layer wider than this is a corrupt manifest, not a model (and would allocate terabytes)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_manifest(data: dict, where: Path) -> None:
    def need(ok: bool, field: str, want: str, value: Any) -> None:
        if not ok:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ManifestError(f"{where}: {field} must be {want}, not {shown}; retrain or re-export to rewrite it")

    def need_dict(value: Any, field: str, optional: bool = True) -> dict:
        need(isinstance(value, dict) or (optional and value is None), field, "a JSON object", value)
        return value or {}

    if "model" in data:
        model = need_dict(data["model"], "model", optional=False)
        need(isinstance(model.get("name"), str) and model["name"] != "", "model.name", "a model name", model.get("name"))
        for k, v in need_dict(model.get("hparams"), "model.hparams").items():  # models.check_hparams: per kind
            need(_is_int(v) and 1 <= v <= MAX_WIDTH or _is_number(v) and 0 <= v <= 1, f"model.hparams.{k}",
                 f"a width (an integer from 1 to {MAX_WIDTH}) or a rate (a number from 0 to 1)", v)
        shape = model.get("input_shape")
        if shape is not None:
            need(isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_is_int(d) and d > 0 for d in shape)
                 and math.prod(shape) == IMAGE_SIZE, "model.input_shape",
                 f"a list of positive integers with product {IMAGE_SIZE} (one 28x28 image)", shape)
    pre = need_dict(data.get("preprocessing"), "preprocessing")
    for k in ("scale", "mean", "std"):
        if k in pre:
            need(_is_number(pre[k]) and (k == "mean" or pre[k] > 0), f"preprocessing.{k}",
                 "a positive number" if k != "mean" else "a number", pre[k])
    for k in ("versions", "metrics", "training", "data"):
        need_dict(data.get(k), k)
    entries = need_dict(data["artifacts"], "artifacts", optional=False)
    for key, entry in entries.items():
        _check_entry(need_dict(entry, f"artifacts.{key}", optional=False), f"artifacts.{key}", need)


def _check_entry(entry: dict, field: str, need) -> None:
    status = entry.get("status", "ok")
    need(isinstance(status, str), f"{field}.status", "a string", status)
    made = status == "ok"  # a failed export has no file: its sha256 and size are null
    files = entry.get("files")
    need(files is None or isinstance(files, list) and len(files) > 0, f"{field}.files", "a non-empty list", files)
    for f, e in [(field, entry)] + [(f"{field}.files[{i}]", x) for i, x in enumerate(files or [])]:
        need(isinstance(e, dict), f, "a JSON object", e)
        need(isinstance(e.get("path"), str) and e["path"] != "", f"{f}.path", "a file name", e.get("path"))
        need(_stays_inside(e["path"]), f"{f}.path", "a file name inside the artifacts folder", e["path"])
        sha, size = e.get("sha256"), e.get("size_bytes")
        need(isinstance(sha, str) and _SHA256.fullmatch(sha) is not None or (not made and sha is None),
             f"{f}.sha256", "64 lowercase hex digits", sha)
        need(_is_int(size) and size >= 0 or (not made and size is None), f"{f}.size_bytes",
             "a non-negative integer", size)
    for k in ("format", "error", "source_state_dict_sha256", "runtime"):
        v = entry.get(k)
        need(v is None or isinstance(v, str), f"{field}.{k}", "a string", v)
    need(entry.get("options") is None or isinstance(entry["options"], dict), f"{field}.options",
         "a JSON object", entry.get("options"))
    parity = entry.get("parity")
    need(parity is None or isinstance(parity, dict), f"{field}.parity", "a JSON object", parity)
    criteria = (parity or {}).get("criteria")
    if criteria is not None:
        need(isinstance(criteria, dict) and criteria.get("kind") in ("logits", "predictions"),
             f"{field}.parity.criteria", 'an object of kind "logits" or "predictions"', criteria)
        keys = ("atol", "rtol", "min_agreement") if criteria["kind"] == "logits" else \
            ("min_agreement", "max_accuracy_drop")
        for k in keys:
            need(_is_number(criteria.get(k)) and criteria[k] >= 0, f"{field}.parity.criteria.{k}",
                 "a non-negative number", criteria.get(k))


def save_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    return atomic_write_json(manifest_path(folder), manifest)


def artifact_entry(path: str | os.PathLike, *others: str | os.PathLike, **fields: Any) -> dict:
    """A manifest entry for an artifact: its main file's name (relative to the manifest), sha256 and
    size, plus ``fields``. An artifact of several files (OpenVINO IR: ``.xml`` + ``.bin``) passes the
    others too; every file is then listed under ``files`` with its own sha256 and size, and
    ``size_bytes`` is their total."""
    paths = [Path(path), *(Path(o) for o in others)]
    files = [{"path": p.name, "sha256": sha256_file(p), "size_bytes": p.stat().st_size} for p in paths]
    entry = {**files[0], "size_bytes": sum(f["size_bytes"] for f in files)}
    if len(files) > 1:
        entry["files"] = files
    return {**entry, **fields}


def record_artifact(folder: str | os.PathLike, key: str, path: str | os.PathLike, *others: str | os.PathLike,
                    **fields: Any) -> dict:
    """Add or replace the artifact ``key`` in ``folder``'s manifest and save it atomically."""
    manifest = load_manifest(folder, required=False)
    entry = artifact_entry(path, *others, **fields)
    manifest["artifacts"][key] = entry
    save_manifest(folder, manifest)
    return entry


def _stays_inside(relpath: str) -> bool:
    """Whether a manifest path names a file under the manifest's folder: relative, no ``..``."""
    rel = Path(relpath)
    return not rel.is_absolute() and ".." not in rel.parts and "\x00" not in relpath


def _contained(folder: str | os.PathLike, relpath: str) -> Path:
    """``folder / relpath``, refused unless it stays inside ``folder``: no absolute path, no ``..``, no
    symlink that leads out. A manifest vouches only for files of its own folder; otherwise a hash that
    matches could approve any file on the machine (``/etc/passwd``, a model placed elsewhere)."""
    if not _stays_inside(relpath):
        raise ManifestError(f"{manifest_path(folder)}: artifact path {relpath!r} is outside {folder}; refusing it")
    path = Path(folder) / relpath
    target, root = path.resolve(), Path(folder).resolve()
    if not target.is_relative_to(root):
        raise IntegrityError(f"{path}: leads to {target}, outside {folder} (a symlink?); refusing to load it")
    return path


def verified_path(folder: str | os.PathLike, key: str, manifest: dict | None = None) -> Path:
    """Return the path of artifact ``key`` after checking its sha256 against the manifest.

    Every loader of a TorchScript, ONNX, pt2 or OpenVINO file goes through this: those files can run
    code or change behaviour when tampered with, so a file the manifest does not vouch for is never
    loaded. For an artifact of several files every one is checked; the main file's path is returned.
    """
    manifest = load_manifest(folder, need_model=False) if manifest is None else manifest
    entry = manifest.get("artifacts", {}).get(key)
    if entry is None:
        raise ManifestError(f"{manifest_path(folder)}: no artifact '{key}' recorded; export it first")
    files = entry.get("files") or [entry]
    paths = [_verified_file(folder, key, f) for f in files]
    if entry.get("files") and entry.get("path") != files[0].get("path"):
        raise ManifestError(f"{manifest_path(folder)}: artifact '{key}' names {entry.get('path')!r} as its "
                            f"file but lists {files[0].get('path')!r} first")
    return paths[0]


def _verified_file(folder: str | os.PathLike, key: str, entry: dict) -> Path:
    path = _contained(folder, entry["path"])
    if not path.is_file():
        raise IntegrityError(f"{path}: listed in the manifest as '{key}' but missing")
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        raise IntegrityError(
            f"{path}: sha256 {actual[:12]}... is not the manifest's {str(entry.get('sha256'))[:12]}...; "
            "the file was changed after it was made, refusing to load it"
        )
    return path
