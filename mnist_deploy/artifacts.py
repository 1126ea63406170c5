"""Atomic writes, sha256, the manifest and safe checkpoint loading.

A leaf module: it knows nothing of models, formats or stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError, IntegrityError, ManifestError

MANIFEST_NAME = "manifest.json"
STATE_DICT_NAME = "mnist_model_state_dict.pth"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success fsync it and ``os.replace`` it over ``path``.

    For writers that want a file name (``torch.onnx.export``, ``torch.export.save``). On any
    exception, KeyboardInterrupt included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then write the bytes atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a ``.pth`` with ``weights_only=True``; a pickle that would run code is refused, not run."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (or, long ago, a pickle)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; "
                              f"this file starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain containers "
            f"(loading it could run code). {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


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
    model = data.get("model")
    if (required if need_model is None else need_model) and not (isinstance(model, dict) and "name" in model):
        raise ManifestError(f"{path}: has no model entry; run `mnist-deploy train` first")
    return data


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
    path = Path(folder) / entry["path"]
    if not path.is_file():
        raise IntegrityError(f"{path}: listed in the manifest as '{key}' but missing")
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        raise IntegrityError(
            f"{path}: sha256 {actual[:12]}... is not the manifest's {str(entry.get('sha256'))[:12]}...; "
            "the file was changed after it was made, refusing to load it"
        )
    return path
