"""Request parsing: JSON bodies and uploaded files into Python values, with typed errors.

Nothing here knows a status code: each error class carries its own (:mod:`mnist_deploy.errors`): a
body that is not JSON is :class:`BadRequest` (400), a wrong Content-Type is :class:`UnsupportedMedia`
(415), and JSON of the wrong shape or values is an :class:`~mnist_deploy.errors.InputError` (422).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import BadRequest, InputError, NotFound, UnsupportedMedia, first_line

UNSUPPORTED = ("Content-Type must be application/json (pixels), multipart/form-data (an image file in the "
               "field 'file') or image/* (the image as the body); got {!r}")


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (the answers are small and hot)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def loads(body: bytes) -> Any:
    """Parse a JSON body; every way it can fail is a :class:`BadRequest` naming the problem.

    orjson: strict RFC 8259 (no NaN or Infinity literals, no number too large for a double, at most
    1,024 levels of nesting, UTF-8 only), and about 6x faster than ``json`` on a 784-value body.
    """
    if not body:
        raise BadRequest("empty body; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {first_line(exc)}") from None


def json_field(body: bytes, key: str = "pixels") -> Any:
    """``obj[key]`` of a JSON object body, or an error saying what was expected."""
    if not body:
        raise BadRequest(f'empty body; send JSON {{"{key}": [784 values in 0..255]}}')
    obj = loads(body)
    if not isinstance(obj, dict) or key not in obj:
        raise InputError(f'expected a JSON object with a "{key}" field')
    value = obj[key]
    # numpy reads [true, 0, ...] as [1, 0, ...]; the bytes test keeps the walk off the hot path.
    if (b"true" in body or b"false" in body) and has_bool(value):
        raise InputError(f"{key} must be numbers in 0..255, got booleans (true/false) among them")
    return value


def media_type(content_type: str | bytes) -> str:
    """The media type of a Content-Type header, lower case, without parameters."""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    return content_type.split(";", 1)[0].strip().lower()


async def uploads(request, media: str, limit: int) -> list[tuple[str, bytes]]:
    """The image files of a multipart body or an ``image/*`` body, as (name, bytes)."""
    if media == "multipart/form-data":
        form = await request.form(max_files=limit, max_fields=limit + 8)
        try:
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if not isinstance(v, str)]
        finally:
            await form.close()
        if not files:
            raise InputError("the multipart body has no file; send the image in the field 'file'")
        return files
    if media.startswith("image/"):
        return [("body", await request.body())]
    raise UnsupportedMedia(UNSUPPORTED.format(media or "(none)"))


def has_bool(obj: Any) -> bool:
    """Whether a parsed JSON value holds ``true`` or ``false`` anywhere (numpy would read them as 1 and 0).

    An explicit stack, not recursion: orjson accepts 1,024 levels of nesting, deeper than Python's
    recursion limit allows a recursive walk to go (a RecursionError there was a 500)."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if value is True or value is False:
            return True
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return False


__all__ = ["BadRequest", "NotFound", "UnsupportedMedia", "dumps", "has_bool", "json_field", "loads", "media_type", "uploads"]
