"""The one MNIST-style preprocessing: any image Pillow reads -> a 28x28 MNIST-like image (white digit
on black, longer side 20 px, centred by its centre of mass) -> the model's normalised input.
``predict`` (files) and ``serve`` (uploads, the drawing page) both go through it."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ..errors import InputError, first_line
from .mnist import MEAN, STD, normalize_pixels

# Refuse images whose header claims more pixels than this, before decoding them (decompression bombs,
# and legal but slow ones: a 16-bit 4096x4096 PNG takes most of a second). A digit needs 28x28; a 12 MP
# phone photo is over the limit and is answered at once, with the limit in the message.
MAX_IMAGE_PIXELS = 2048 * 2048
# Larger images are shrunk to this longer side before the digit is searched for (speed, memory).
_WORK_SIDE = 1024
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".pbm", ".pnm"}
)
DIGIT_BOX = 20  # MNIST: the digit's longer side is scaled to 20 px...
FIELD = 28  # ...and placed in a 28x28 field with its centre of mass at (14, 14)
_CENTRE = 14.0




def _open_image(source: Any, max_pixels: int, name: str):
    """A decoded single-frame Pillow image from bytes, a path or an image, its size checked first."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return _decode(source, name, max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode(io.BytesIO(source), name, max_pixels)
    try:
        fh = open(source, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise InputError(f"{name}: cannot read: {exc.strerror or exc}") from None
    with fh:
        return _decode(fh, name, max_pixels)


def _open_header(fh: Any, name: str):
    """``Image.open``: reads the header only, so the size is known before any pixel is decoded."""
    from PIL import Image

    try:
        return Image.open(fh)
    except Image.UnidentifiedImageError:
        raise InputError(f"{name}: not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own, larger limit, checked in open()
        raise InputError(f"{name}: {first_line(exc)}; refusing to decode it") from None
    except Exception as exc:  # noqa: BLE001 - a malformed header can raise many types in Pillow's plugins
        raise InputError(f"{name}: not a readable image ({first_line(exc)})") from None


def _check_size(img, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputError(
            f"{name}: image header claims {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            "refusing to decode it"
        )


def check_image_header(blob: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "image") -> None:
    """Read only the header of an image in ``blob`` and raise :class:`InputError` if it is not an image or
    claims more than ``max_pixels``. Cheap (no pixel is decoded): the server runs it before queueing."""
    with _open_header(io.BytesIO(blob), name) as img:
        _check_size(img, name, max_pixels)


def _decode(fh_or_image: Any, name: str, max_pixels: int):
    from PIL import Image, ImageOps

    img = fh_or_image if isinstance(fh_or_image, Image.Image) else _open_header(fh_or_image, name)
    _check_size(img, name, max_pixels)
    w, h = img.size
    try:
        if img.format == "JPEG" and max(w, h) > 2 * _WORK_SIDE:
            img.draft("L", (_WORK_SIDE, _WORK_SIDE))  # decode a big JPEG at reduced scale directly
        img.load()
        img = ImageOps.exif_transpose(img)  # phone photos: honour the orientation tag
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data raises OSError, SyntaxError, ...
        raise InputError(f"{name}: image data is corrupt or truncated ({first_line(exc)})") from None
    return img


def _grayscale(img, name: str) -> np.ndarray:
    """float32 (H, W) in 0..255; an image Pillow cannot convert (a LAB or CMYK TIFF...) is an InputError."""
    try:
        return _to_gray(img)
    except (ValueError, OSError, TypeError) as exc:  # "conversion from LAB to L not supported", odd modes
        raise InputError(f"{name}: cannot convert a {img.mode} image to grayscale ({first_line(exc)})") from None


def _to_gray(img) -> np.ndarray:
    """float32 (H, W) in 0..255. Transparent pixels become the background: the ink is what is opaque."""
    mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        lum = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
        alpha = rgba[..., 3] / 255.0
        weight = float(alpha.sum())
        ink = float((lum * alpha).sum() / weight) if weight > 0 else 0.0
        background = 0.0 if ink > 127.5 else 255.0  # opposite the ink, so light ink on clear stays visible
        return lum * alpha + background * (1.0 - alpha)
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32) / 257.0
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if mode == "I" and arr.max(initial=0) > 255:
            arr = arr / 257.0
        return np.clip(arr, 0, 255)
    return np.asarray(img.convert("L"), dtype=np.float32)


def _border(gray: np.ndarray) -> np.ndarray:
    return np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])


def mnist_image(source: Any, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> np.ndarray:
    """Turn an image (bytes, a path or a Pillow image) into a 28x28 float32 MNIST-like image in 0..255.

    As MNIST was made: grayscale; inverted when the background (the border) is light, so the digit is
    white on black; the background level is subtracted and the contrast stretched; cropped to the
    digit's bounding box; the longer side scaled to 20 px keeping the aspect ratio; pasted into 28x28
    with its centre of mass at the centre. Raises :class:`InputError` for anything that is not a
    readable image, claims more than ``max_pixels``, or has no digit in it; its message starts with
    ``name`` (default: the path, or "image").
    """
    from PIL import Image

    if name is None:
        name = str(source) if isinstance(source, str | os.PathLike) else "image"
    img = _open_image(source, max_pixels, name)
    if max(img.size) > _WORK_SIDE:
        img = img.copy()
        img.thumbnail((_WORK_SIDE, _WORK_SIDE), Image.Resampling.BOX)
    gray = _grayscale(img, name)
    if np.median(_border(gray)) > 127.5:
        gray = 255.0 - gray
    # The background level and its noise (paper grain, JPEG ringing) come from the border: whatever is
    # within 5 robust standard deviations of it is background. MNIST and a clean drawing: exactly 0.
    border = _border(gray)
    level = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - level)))
    gray = np.clip(gray - (level + 5.0 * noise), 0.0, None)
    peak = float(gray.max())
    if not np.isfinite(peak) or peak <= 0.0:
        raise InputError(f"{name}: no digit found, the image is blank (a single colour)")
    gray *= 255.0 / peak
    rows = np.flatnonzero(gray.any(axis=1))
    cols = np.flatnonzero(gray.any(axis=0))
    digit = gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = digit.shape
    scale = DIGIT_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        digit = np.asarray(Image.fromarray(digit, mode="F").resize(size, Image.Resampling.LANCZOS))
        digit = np.clip(digit, 0.0, 255.0)
    h, w = digit.shape
    mass = float(digit.sum())
    cy = float((digit.sum(axis=1) * np.arange(h)).sum() / mass)
    cx = float((digit.sum(axis=0) * np.arange(w)).sum() / mass)
    top = min(max(round(_CENTRE - cy), 0), FIELD - h)
    left = min(max(round(_CENTRE - cx), 0), FIELD - w)
    out = np.zeros((FIELD, FIELD), dtype=np.float32)
    out[top : top + h, left : left + w] = digit
    return out


def preprocess_image(source: Any, *, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None,
                     mean: float = MEAN, std: float = STD) -> np.ndarray:
    """Any image -> the model's input: float32 (1, 784), MNIST-like (see :func:`mnist_image`) and normalised
    by :func:`data.normalize_pixels` with ``mean`` and ``std`` (pass the manifest's: :func:`manifest_normalization`)."""
    return normalize_pixels(mnist_image(source, max_pixels=max_pixels, name=name), mean=mean, std=std)


def pixels_to_array(values: Any, *, batch: bool = False) -> np.ndarray:
    """Validate raw pixel values (784 numbers in 0..255, row-major 28x28; a list of them when ``batch``).

    Returns float32 (N, 784) in 0..255. Raises :class:`InputError` saying what is wrong.
    """
    what = "pixels"
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{what} must be {'a list of ' if batch else ''}784 numbers; got a ragged or mixed list") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise InputError(f"{what} must be numbers in 0..255, got {_kind(arr)}")
    shape = arr.shape
    if batch:
        if arr.size == 0:
            raise InputError(f"{what}: the list of images is empty")
        if arr.ndim == 3 and shape[1:] == (FIELD, FIELD):
            arr = arr.reshape(shape[0], -1)
        if arr.ndim != 2 or arr.shape[1] != FIELD * FIELD:
            raise InputError(f"{what} must be a list of images of 784 values (row-major 28x28); got shape {shape}")
    else:
        if shape not in ((FIELD * FIELD,), (FIELD, FIELD)):
            got = f"{arr.size} values" if arr.ndim == 1 else f"shape {shape}"
            raise InputError(f"{what} must hold 784 values (row-major 28x28), got {got}")
        arr = arr.reshape(1, -1)
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.flatnonzero(~finite.ravel())[0])
        raise InputError(f"{what} must be finite numbers; value {arr.ravel()[i]} at index {_index(i, batch)}")
    bad = (arr < 0) | (arr > 255)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise InputError(f"{what} must be in 0..255; value {arr.ravel()[i]:g} at index {_index(i, batch)}")
    return arr


def _index(i: int, batch: bool) -> str:
    return f"[{i // 784}][{i % 784}]" if batch else str(i)


def _kind(arr: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "other objects (null, nested lists...)"}.get(
        arr.dtype.kind, str(arr.dtype)
    )


