"""Image locations -> the URLs a job carries. sibylq never fetches an image from the network:
``http(s)://`` URLs travel as they are (the API fetches them), ``data:`` URLs too, and a local
file is read here, in the caller's process, and sent inline as a base64 ``data:`` URL."""

from __future__ import annotations

import base64
from pathlib import Path

from wire.contract import IMAGE_URL_PREFIXES
from wire.errors import InvalidRequestError

#: The largest image file read from disk: OpenAI's own limit per image. Every byte travels
#: through Redis (a third more as base64), so a smaller, resized image is kinder.
MAX_IMAGE_BYTES = 20 * 1024 * 1024

#: Leading bytes of the image formats vision APIs take, and their MIME types.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def image_url(location: str | Path) -> str:
    """The URL a job carries for ``location``: a URL as it is, a local file as a data URL.
    Raises InvalidRequestError for a missing, unreadable, oversized or non-image file."""
    if isinstance(location, str) and location.startswith(IMAGE_URL_PREFIXES):
        return location
    if isinstance(location, str) and location.startswith(("ftp://", "data:")):
        raise InvalidRequestError(
            f"image {location[:40]!r}: give an http(s):// URL, a data:image/... URL or a "
            "local image file"
        )
    path = Path(location).expanduser()
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise InvalidRequestError(
                f"image file {str(path)!r} is {size} bytes; at most {MAX_IMAGE_BYTES} are sent "
                "(resize it, or give its http(s) URL)"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read image file {str(path)!r}: {exc.strerror or exc}"
        ) from exc
    mime = image_type(data)
    if mime is None:
        raise InvalidRequestError(
            f"{str(path)!r} is not a PNG, JPEG, GIF or WebP image; vision models take those"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_type(data: bytes) -> str | None:
    """The MIME type of image ``data`` by its signature, or None when it is no image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for signature, mime in _SIGNATURES if data.startswith(signature)), None)
