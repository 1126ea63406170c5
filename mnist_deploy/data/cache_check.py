"""Checks of the preprocessed-tensor cache (issue 18): a digest of its tensors, their shapes, dtypes,
label and pixel ranges, the labels against MNIST's own file, and the stamp of the last full check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..artifacts.files import atomic_write_text
from ..errors import DataError
from .idx import FILES, SPLITS, read_bounded
from .normalize import MEAN, STD, scale


def stat_stamp(path: Path) -> list | None:
    """What changes whenever a file's content can have: its identity, size, mtime and ctime (a write,
    a rename onto it, or resetting its mtime all move ctime, which user space cannot set back)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]



def tensor_digest(images, labels) -> str:
    """sha256 over what a cached split holds: each tensor's dtype, shape and bytes (hashlib releases the
    GIL and runs at memory speed; measured in docs/reliability-ops.md)."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()



# Normalised uint8 pixels lie between these two float32 values (what 0 and 255 become).
PIXEL_RANGE = tuple(float(v) for v in scale(np.array([0.0, 255.0], dtype=np.float32), MEAN, STD))



def check_split(split: str, images, labels) -> str | None:
    """Why a cached split is not what preprocessing MNIST gives, or None: dtypes, shapes, the count the
    IDX headers of the verified files give, labels in 0..9 (cheap: done on every load)."""
    import torch

    count = FILES[SPLITS[split][1]].dims[0]  # the IDX header every verified source file has
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return "the images and labels are not tensors"
    if images.dtype != torch.float32 or tuple(images.shape) != (count, 784):
        return f"images are {images.dtype} {tuple(images.shape)}, not float32 ({count}, 784)"
    if labels.dtype != torch.int64 or tuple(labels.shape) != (count,):
        return f"labels are {labels.dtype} {tuple(labels.shape)}, not int64 ({count},)"
    y = labels.numpy()  # numpy, not torch: no intra-op thread pool wake-up for 60,000 numbers
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi > 9:
        return f"labels range over {lo}..{hi}, not 0..9"
    return None



def check_pixels(images) -> str | None:
    """Why cached pixel values are not normalised 0..255 values (NaN, inf, out of range), or None. A pass
    over 188 MB: done when the entry is not the file this process family wrote (see :func:`_read_cache`)."""
    import torch

    lo, hi = torch.aminmax(images)  # a NaN makes both NaN, and then fails the range check
    if not (PIXEL_RANGE[0] <= float(lo) and float(hi) <= PIXEL_RANGE[1]):
        return f"pixel values range over {float(lo):.4g}..{float(hi):.4g}, outside the normalised 0..255"
    return None



def verified_file(path: Path) -> Path:
    return path.with_name(path.name + ".verified")



def unchanged_since_verified(path: Path, before: list | None, digest) -> bool:
    """True when ``path`` is, by its stat stamp, the very file whose tensors were hashed to ``digest``
    and checked (recorded beside it by :func:`record_verified`), and it did not change while loaded.
    Any write, a rename onto it or a copy moves its ctime or inode (user space cannot set ctime back),
    so the warm path skips re-hashing 220 MB, as it skips re-reading the source files."""
    import json

    try:
        recorded = json.loads(verified_file(path).read_text())
    except (OSError, ValueError):
        return False
    return (before is not None and isinstance(digest, str) and recorded == {"stamp": before, "digest": digest}
            and stat_stamp(path) == before)



def record_verified(path: Path, stamp: list | None, digest: str) -> None:
    """Note that the cache file with ``stamp`` hashed to ``digest`` and passed its checks (best effort)."""
    import json

    if stamp is None or stat_stamp(path) != stamp:
        return
    try:
        atomic_write_text(verified_file(path), json.dumps({"stamp": stamp, "digest": digest}))
    except OSError:
        pass  # a read-only cache folder: the entry is checked in full on every load



def labels_differ(path: Path, key: str, labels) -> str | None:
    """Why cached ``labels`` are not the labels in the source file ``path`` (read and MD5-checked: 60 KB,
    about a millisecond), or None. A digest stored in the cache proves only that the entry was not
    changed by someone who could not also recompute it; this compares with MNIST itself."""
    spec = FILES[key]
    try:
        raw = read_bounded(path, spec.nbytes)
    except DataError as exc:
        return str(exc)
    if hashlib.md5(raw).hexdigest() != spec.md5:
        return f"its source {path} no longer has MNIST's MD5"
    source = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if source.shape != tuple(labels.shape) or not np.array_equal(source, labels.numpy()):
        changed = int((source != labels.numpy()).sum()) if source.shape == tuple(labels.shape) else "all"
        return f"its labels differ from {path} ({changed} of {source.shape[0]})"
    return None
