"""Atomic writes, fsync, sha256 and safe checkpoint loading: a leaf that knows nothing of manifests."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import secrets
import stat
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, first_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success fsync it and ``os.replace`` it over ``path``.

    For writers that want a file name (``torch.onnx.export``, ``torch.export.save``). On any
    exception, KeyboardInterrupt included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path, mode = _create_temp(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fchmod(fh.fileno(), mode)  # in case the writer replaced the file with one of its own mode
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create an empty ``.NAME.XXXX.tmp`` beside ``path``; return it and the mode the umask gave it.

    Not ``mkstemp``: its 0600 would survive the rename, so files another user should read (the
    manifest, the model) would not be readable. Created 0666 and filtered by the umask, as ``open`` does.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{path.parent}: no free temporary file name for {path.name}")


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


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (temp files named after a dead writer may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def size_text(n: int | None) -> str:
    """A file size for a table cell, in one convention everywhere (export, bench): SI decimal units,
    ``kB`` = 1,000 bytes and ``MB`` = 1,000,000 (what ``ls --si`` prints), ``-`` for none."""
    if n is None:
        return "-"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} MB"
    if n >= 1_000:
        return f"{n / 1e3:.1f} kB"
    return f"{n} B"


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
    if head == b"PK" and _is_torchscript_archive(path):
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a state_dict "
                              "(torch.save(model.state_dict())); refusing to load it as weights")
    try:
        # torch warns on its way to some of the failures below; the error line says it all, so the
        # warnings are held back and shown only when the load succeeds.
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain containers "
            f"(loading it could run code). {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = first_line(exc)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return obj


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold ``ARCHIVE/constants.pkl`` and ``ARCHIVE/code/``; torch.save's do not
    (torch.load tells them apart the same way)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False  # torch.load says what is wrong with it
    return any(n.split("/", 1)[-1] == "constants.pkl" or n.split("/", 2)[1:2] == ["code"] for n in names)


