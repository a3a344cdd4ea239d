"""Cheap checks that a file or archive member holds a readable image (shared by the data sources and
the webdataset index): the signature and end marker from a file's first and last bytes, and a full
PIL decode for ``--check-images``."""

from __future__ import annotations

import io
import re
from typing import Optional

__all__ = ["IMAGE_EXTENSIONS", "check_image_bytes"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pnm",
                    ".ppm", ".pgm")

#: Bytes read from the start and the end of a file for :func:`check_image_bytes`.
_HEAD = 16
_TAIL = 64


def check_image_bytes(head: bytes, tail: bytes, size: int) -> Optional[str]:
    """Why an image looks unreadable from its first and last bytes, or ``None`` if it looks fine."""
    if size == 0:
        return "empty file"
    if head.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" not in tail:
            return "truncated JPEG (no end-of-image marker)"
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in tail:
            return "truncated PNG (no IEND chunk)"
        return None
    if head.startswith(b"BM") or head.startswith(b"II*\x00") or head.startswith(b"MM\x00*"):
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return None
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        return None
    return "not a supported image format (unknown signature)"


def _pil_decode_error(data: bytes) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means "corrupt"
        msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(e))
        return f"cannot be decoded ({type(e).__name__}: {msg})"
    return None
