"""MNIST: find, verify, download, read and preprocess the four IDX files.

Accepts a flat folder of the four files or torchvision's layout (``DIR/MNIST/raw/``), each gzip or
raw. Every file is checked against the canonical MD5 of its uncompressed bytes and its IDX header.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts.files import atomic_path, atomic_write_bytes
from ..errors import DataError
from .cache_check import (
    check_pixels,
    check_split,
    labels_differ,
    record_verified,
    stat_stamp,
    tensor_digest,
    unchanged_since_verified,
)
from .idx import FILES, SPLITS, gunzip_bounded, parse_idx, read_bounded

# normalize_pixels and manifest_normalization live in .normalize; re-exported here, where callers have found them.
from .normalize import MEAN, STD, manifest_normalization, normalize, normalize_pixels  # noqa: F401

CACHE_FORMAT = 3  # 2: source files' stat stamps beside their MD5s; 3: a sha256 of the tensors' bytes
_LOG = logging.getLogger(__name__)
DATA_ENV = "MNIST_DEPLOY_DATA"
CACHE_ENV = "MNIST_DEPLOY_CACHE"
# The HTTPS mirror torchvision downloads from.
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, else ``$MNIST_DEPLOY_DATA``, else ``./data``."""
    if data_dir:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path("data")


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``--cache-dir``, else ``$MNIST_DEPLOY_CACHE``, else ``~/.cache/mnist-deploy`` (the data folder may be read-only)."""
    if cache_dir:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "mnist-deploy"


def _candidates(root: Path, name: str) -> list[Path]:
    out = []
    for folder in (root, root / "MNIST" / "raw"):
        out += [folder / name, folder / f"{name}.gz"]
    return out


def find_file(root: Path, key: str) -> Path | None:
    for cand in _candidates(root, FILES[key].name):
        if cand.is_file():
            return cand
    return None


def load_verified(path: Path, key: str) -> tuple[np.ndarray, str]:
    """Read one file, check its IDX header against the expected one and its MD5; return (array, md5)."""
    spec = FILES[key]
    raw = read_bounded(path, spec.nbytes)
    arr = parse_idx(raw, str(path))
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != spec.magic or arr.shape != spec.dims:
        raise DataError(
            f"{path}: IDX header says magic {magic:#06x} shape {arr.shape}, expected {spec.magic:#06x} {spec.dims}"
        )
    md5 = hashlib.md5(raw).hexdigest()
    if md5 != spec.md5:
        raise DataError(f"{path}: MD5 {md5} is not MNIST's {spec.md5} (file modified or corrupt)")
    return arr, md5


def download(root: Path, keys: list[str], *, timeout: float = 15.0, progress: bool = True) -> None:
    """Fetch the missing files over HTTPS into ``root/MNIST/raw/`` (torchvision's layout), verified."""
    dest = root / "MNIST" / "raw"
    for key in keys:
        spec = FILES[key]
        url = MIRROR + spec.name + ".gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https URL)
                total = int(resp.headers.get("Content-Length") or 0)
                data = _read_with_progress(resp, total, spec.name, progress, url=url, limit=spec.nbytes + (1 << 20))
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"cannot download {url} ({reason}); no network? Put the four MNIST files in {root} "
                f"or point --data-dir / ${DATA_ENV} at a local copy"
            ) from None
        raw = gunzip_bounded(data, spec.nbytes, f"{url}: downloaded file")
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != spec.md5:
            raise DataError(f"{url}: downloaded data has MD5 {md5}, expected {spec.md5}; not saved")
        try:
            atomic_write_bytes(dest / f"{spec.name}.gz", data)
        except OSError as exc:  # a full disk or a read-only folder: nothing half-written is left
            raise DataError(f"{dest / spec.name}.gz: cannot save the download ({exc.strerror or exc}); "
                            f"free some space or point --data-dir at another folder") from None


def _read_with_progress(resp, total: int, label: str, progress: bool, *, url: str, limit: int) -> bytes:
    """The response body, at most ``limit`` bytes (a gzip of an MNIST file is smaller than the file)."""
    if total > limit:
        raise DataError(f"{url}: {total:,} bytes announced, more than {limit:,}; not an MNIST file")
    chunks, size = [], 0
    bar = task = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"download {label}", total=total or None)
    try:
        while chunk := resp.read(1 << 16):
            size += len(chunk)
            if size > limit:
                raise DataError(f"{url}: more than {limit:,} bytes; not an MNIST file")
            chunks.append(chunk)
            if bar is not None:
                bar.advance(task, len(chunk))
    finally:
        if bar is not None:
            bar.stop()
    return b"".join(chunks)


@dataclass
class RawMnist:
    """The four verified arrays (uint8 images, uint8 labels) and the MD5 of each source file."""

    root: Path
    arrays: dict[str, np.ndarray]
    md5: dict[str, str]
    paths: dict[str, Path]
    stamps: dict[str, list] = field(default_factory=dict)  # each file's stat, taken before it was read


def load_raw(data_dir: str | os.PathLike | None = None, *, allow_download: bool = True) -> RawMnist:
    root = resolve_data_dir(data_dir)
    paths = {k: find_file(root, k) for k in FILES}
    missing = [k for k, p in paths.items() if p is None]
    if missing:
        names = ", ".join(FILES[k].name for k in missing)
        if not allow_download:
            raise DataError(
                f"{root}: missing {names} (looked for raw and .gz, flat and in MNIST/raw/); "
                f"point --data-dir or ${DATA_ENV} at a folder with the four MNIST files"
            )
        download(root, missing)
        paths = {k: find_file(root, k) for k in FILES}
    arrays, md5, stamps = {}, {}, {}
    for key, path in paths.items():
        stamps[key] = stat_stamp(path)
        arrays[key], md5[key] = load_verified(path, key)
    return RawMnist(root, arrays, md5, paths, stamps)


@dataclass
class Split:
    """A preprocessed split: float32 (N, 784) normalised images and int64 labels, as torch tensors."""

    images: object  # torch.Tensor
    labels: object  # torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _cache_file(cache_dir: Path, split: str) -> Path:
    return cache_dir / f"mnist_{split}_processed.pth"


def load_splits(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = True,
) -> tuple[dict[str, Split], dict[str, str]]:
    """Return the preprocessed train and test splits and the source files' MD5s, from the cache when
    it was built from these very files.

    A cache entry records the MD5 each source file had when it was verified and the file's stat stamp
    (:func:`.cache_check.stat_stamp`) taken before that read. When every source file's stamp is unchanged the cache is
    used (memory-mapped); otherwise the files are read and verified again (MD5 and IDX header,
    about 0.3 s), so a changed source rebuilds the cache and a tampered one fails loudly.

    The entry itself is checked on every load: its tensors must hash to the sha256 stored with them
    and be what preprocessing MNIST gives (float32 (N, 784) in the normalised pixel range, int64
    labels in 0..9, N from the IDX header). A cache that fails is rebuilt from the verified source
    files, with a warning naming the file and what was wrong (logger ``mnist_deploy.data.mnist``).
    """
    cache = resolve_cache_dir(cache_dir)
    root = resolve_data_dir(data_dir)
    paths = {k: find_file(root, k) for k in FILES}
    if all(paths.values()):
        stamps = {k: stat_stamp(p) for k, p in paths.items()}
        bad: dict[str, str] = {}
        hit = {split: _read_cache(_cache_file(cache, split), split, bad,
                                  stamps={"images": stamps[i], "labels": stamps[lbl]})
               for split, (i, lbl) in SPLITS.items()}
        for split, (_, lbl) in SPLITS.items():  # labels are cheap to check against the source itself
            why = hit[split] and labels_differ(paths[lbl], lbl, hit[split][0].labels)
            if why:
                hit[split], bad[split] = None, why
        if all(hit.values()):
            md5 = {}
            for split, (img_key, lbl_key) in SPLITS.items():
                md5[img_key], md5[lbl_key] = hit[split][1]["images"], hit[split][1]["labels"]
            return {split: found[0] for split, found in hit.items()}, md5
        for split, why in bad.items():  # never silent: say what was wrong and that it is rebuilt
            _LOG.warning("warning: %s: %s; rebuilding it from the verified MNIST files",
                         _cache_file(cache, split), why)
        return _verify_and_cache(data_dir, cache, allow_download, distrust=set(bad))
    return _verify_and_cache(data_dir, cache, allow_download)


def _verify_and_cache(data_dir, cache: Path, allow_download: bool,
                      distrust: set[str] = frozenset()) -> tuple[dict[str, Split], dict[str, str]]:
    import torch

    raw = load_raw(data_dir, allow_download=allow_download)
    splits: dict[str, Split] = {}
    for split, (img_key, lbl_key) in SPLITS.items():
        key = {"images": raw.md5[img_key], "labels": raw.md5[lbl_key]}
        stamp = {"images": raw.stamps.get(img_key), "labels": raw.stamps.get(lbl_key)}
        path = _cache_file(cache, split)
        bad: dict[str, str] = {}
        found = None if split in distrust else _read_cache(path, split, bad, md5=key)
        if found is not None and not np.array_equal(found[0].labels.numpy(), raw.arrays[lbl_key]):
            bad[split], found = f"its labels differ from {raw.paths[lbl_key]}", None
        for why in bad.values():
            _LOG.warning("warning: %s: %s; rebuilding it from the verified MNIST files", path, why)
        if found is not None and found[2] == stamp:  # this split's files did not change: nothing to write
            splits[split] = found[0]
            continue
        if found is None:
            images = torch.from_numpy(normalize(raw.arrays[img_key]))
            labels = torch.from_numpy(raw.arrays[lbl_key].astype(np.int64))
            found = (Split(images, labels), key, None)
        payload = {"format": CACHE_FORMAT, "source_md5": key, "mean": MEAN, "std": STD,
                   "source_stamp": stamp, "digest": tensor_digest(found[0].images, found[0].labels),
                   "images": found[0].images, "labels": found[0].labels}
        try:
            from ..artifacts.files import atomic_torch_save

            atomic_torch_save(payload, path)  # (re)stamped, so the next run skips the verification
            record_verified(path, stat_stamp(path), payload["digest"])  # hashed and checked as it was made
        except OSError:
            pass  # a read-only cache folder only costs the preprocessing next time
        splits[split] = found[0]
    return splits, raw.md5


def _read_cache(path: Path, split: str, bad: dict[str, str], *, md5: dict | None = None,
                stamps: dict | None = None) -> tuple[Split, dict, dict | None] | None:
    """The cached split, its sources' MD5s and stamps, if the entry matches ``md5`` or ``stamps`` (and
    the normalisation), its tensors hash to the digest stored with them and pass :func:`check_split`.

    None for anything else, which is then rebuilt: a missing or stale entry (other sources, an older
    format) quietly; an unreadable, tampered or malformed one with its reason put in ``bad[split]``,
    for the caller to report."""
    import torch

    if not path.is_file() or (stamps is not None and None in stamps.values()):
        return None
    before = stat_stamp(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
        bad[split] = f"unreadable ({type(exc).__name__})"
        return None
    if (
        not isinstance(obj, dict)
        or obj.get("format") != CACHE_FORMAT
        or (md5 is not None and obj.get("source_md5") != md5)
        or (stamps is not None and obj.get("source_stamp") != stamps)
        or obj.get("mean") != MEAN
        or obj.get("std") != STD
        or not isinstance(obj.get("source_md5"), dict)
    ):
        return None  # stale, not damaged: made from other files, settings or an older version
    images, labels = obj.get("images"), obj.get("labels")
    digest = obj.get("digest")
    why = check_split(split, images, labels)
    if why is None and not unchanged_since_verified(path, before, digest):
        # Not provably the file that was written and checked: hash it and check every value (~0.2 s).
        why = check_pixels(images)
        if why is None and digest != tensor_digest(images, labels):
            why = "its tensors do not match the sha256 stored with them (modified after it was written)"
        if why is None:
            record_verified(path, before, digest)
    if why is not None:
        bad[split] = why
        return None
    return Split(images, labels), obj["source_md5"], obj.get("source_stamp")


def summary(data_dir: str | os.PathLike | None = None, *, allow_download: bool = True) -> dict:
    """Counts per split and per class, and each file's path and verified MD5."""
    raw = load_raw(data_dir, allow_download=allow_download)
    out = {"data_dir": str(raw.root), "files": {}, "splits": {}}
    for key, spec in FILES.items():
        out["files"][spec.name] = {"path": str(raw.paths[key]), "md5": raw.md5[key], "ok": True}
    for split, (_, lbl_key) in SPLITS.items():
        labels = raw.arrays[lbl_key]
        out["splits"][split] = {
            "count": int(labels.shape[0]),
            "per_class": {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=10))},
        }
    return out


def write_preview(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, n: int = 64,
                  allow_download: bool = True) -> Path:
    """Write a PNG grid of the first ``n`` test digits with their labels."""
    from ..plots import digit_grid

    raw = load_raw(data_dir, allow_download=allow_download)
    images = raw.arrays["test-images"][:n]
    labels = raw.arrays["test-labels"][:n]
    with atomic_path(path) as tmp:
        digit_grid(images, [str(int(v)) for v in labels], tmp)
    return Path(path)
