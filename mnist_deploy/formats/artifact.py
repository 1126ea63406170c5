"""Manifest entry -> verified file (sha256) -> predictor: the one way every stage opens an artifact.

``predict``, ``bench``, ``verify``, ``package`` and ``serve`` each used to read the manifest entry,
decide whether it stood for a usable file, check the file's sha256 and call the format's loader,
and the copies disagreed on an entry without a ``status``. Here it is decided once:
:func:`entry_usable` (the decision), :func:`artifact_path` (entry -> verified file) and
:func:`open_artifact` (-> :class:`Predictor`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..artifacts.manifest import manifest_path, verified_path
from ..errors import ManifestError
from .base import Format, Predictor, get_format, load_predictor


def entry_usable(entry: dict) -> bool:
    """Whether a manifest entry stands for a file that may be used: its status is ``ok`` or absent.

    The decision on an entry without ``status``: it is usable (its file is still sha256-checked).
    Such an entry was written before statuses existed, by hand (``record_artifact``), or by ``train``
    itself, whose state_dict, metrics and plot entries carry no status to this day; refusing it would
    refuse ``--runtime pytorch`` and torch.compile. The manifest's shape check already reads it this
    way: an entry without a status must carry a sha256 and a size (only an explicit non-``ok`` status
    may have a null sha256), so it always names a file whose hash can be checked. A failed export is
    always written with ``status: failed`` and its file removed, so no failure can hide behind a
    missing status; and ``verify`` still re-runs the parity gate on every exported entry, with or
    without one.
    """
    return entry.get("status", "ok") == "ok"


def entry_problem(entry: dict | None) -> str | None:
    """None for a usable entry; else why not, in words (``never exported``, ``export failed (...)``)."""
    if entry is None:
        return "was never exported"
    if entry_usable(entry):
        return None
    return f"export failed ({entry.get('error') or entry.get('status')})"


def artifact_entry_checked(manifest: dict, name: str, folder: str | os.PathLike, *, advice: str = "") -> dict:
    """The manifest entry format ``name`` reads, refused (:class:`ManifestError`, exit 2) when it is
    missing or not usable (:func:`entry_usable`). ``advice`` ends the message (what else the user can do)."""
    fmt = get_format(name)
    folder = Path(folder)
    entry = manifest.get("artifacts", {}).get(fmt.key)
    if entry is None:
        make = f"train --out {folder}" if fmt.source else f"export --artifacts {folder} --format {fmt.key}"
        raise ManifestError(f"{manifest_path(folder)}: no '{fmt.key}' artifact; run `mnist-deploy {make}` first{advice}")
    if not entry_usable(entry):
        reason = entry.get("error") or "see the export report"
        raise ManifestError(f"{folder}: the '{fmt.key}' export is marked {entry.get('status')!r} ({reason}){advice}")
    return entry


def artifact_path(manifest: dict, name: str, folder: str | os.PathLike, *, advice: str = "") -> Path:
    """Format ``name``'s main file in ``folder``, after the entry is found usable and every one of its
    files matches the manifest's sha256 (:func:`artifacts.manifest.verified_path`)."""
    artifact_entry_checked(manifest, name, folder, advice=advice)
    return verified_path(folder, get_format(name).key, manifest)


def open_artifact(manifest: dict, name: str, folder: str | os.PathLike, *, device: str = "cpu",
                  threads: int | None = None, advice: str = "") -> Predictor:
    """Manifest entry -> verified file (sha256) -> :class:`Predictor`, for format ``name`` in ``folder``.

    Raises :class:`ManifestError` for a missing or failed entry, :class:`IntegrityError` for a file
    that is missing or changed, :class:`RuntimeUnavailable` when the runtime cannot run on ``device``
    here, and :class:`LoadError` when the runtime cannot load a file whose hash matched.
    """
    fmt: Format = get_format(name)
    path = artifact_path(manifest, fmt.name, folder, advice=advice)
    return load_predictor(fmt.name, path, device, threads, manifest=manifest)


__all__ = ["artifact_entry_checked", "artifact_path", "entry_problem", "entry_usable", "open_artifact"]
