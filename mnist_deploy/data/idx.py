"""The IDX file format MNIST ships in: the four files' names, MD5s and headers, bounded reads (a small
gzip can inflate to gigabytes) and the parser. A leaf of :mod:`mnist_deploy.data`."""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class IdxFile:
    name: str  # uncompressed file name
    md5: str  # MD5 of the uncompressed bytes
    magic: int  # type byte 0x08 (unsigned byte) then number of dimensions
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return 4 + 4 * len(self.dims) + math.prod(self.dims)


FILES: dict[str, IdxFile] = {
    "train-images": IdxFile("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", 0x0803, (60000, 28, 28)),
    "train-labels": IdxFile("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", 0x0801, (60000,)),
    "test-images": IdxFile("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", 0x0803, (10000, 28, 28)),
    "test-labels": IdxFile("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", 0x0801, (10000,)),
}


def read_bounded(path: Path, limit: int) -> bytes:
    """The file's (uncompressed) bytes; more than ``limit`` of them is an error, found without reading
    past ``limit + 1`` (a small gzip can inflate to gigabytes)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                raw = fh.read(limit + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read: {exc} (truncated or not gzip?)") from None
    if len(raw) > limit:
        what = "inflates to" if path.suffix == ".gz" else "has"
        raise DataError(f"{path}: {what} more than the {limit:,} bytes this MNIST file has; not an MNIST file")
    return raw


def gunzip_bounded(data: bytes, limit: int, source: str) -> bytes:
    """Decompress ``data``, refusing (without inflating it all) anything longer than ``limit`` bytes."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            raw = fh.read(limit + 1)
    except (OSError, EOFError, zlib.error):
        raise DataError(f"{source}: not valid gzip") from None
    if len(raw) > limit:
        raise DataError(f"{source}: inflates to more than the {limit:,} bytes expected")
    return raw


MAX_IDX_DIMS = 8  # MNIST has 1 or 3; numpy allows 64. Anything more is not an image file.


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes (big-endian magic, one 4-byte size per dimension, row-major data) into uint8."""
    if len(raw) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim == 0:
        raise DataError(f"{source}: bad IDX magic {raw[:4].hex()} (expected 0000 08 then the number of dimensions)")
    if ndim > MAX_IDX_DIMS:
        raise DataError(f"{source}: IDX header claims {ndim} dimensions (at most {MAX_IDX_DIMS} accepted)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)  # Python integers: a header cannot overflow the check
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{source}: {what}: header {dims} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


SPLITS = {"train": ("train-images", "train-labels"), "test": ("test-images", "test-labels")}
