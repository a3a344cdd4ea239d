"""The data tests' coded images: record ``i``'s image carries its number in its pixels, so a test can
read back which record a loader returned and whether it was flipped."""

import io

import numpy as np
from PIL import Image


def coded_image(i: int, fmt: str = "PNG", **save) -> bytes:
    """Encoded bytes (``fmt``, PIL's ``save`` options) of a 48×64 (H×W) image: left half RGB
    (20 + 9·i, 120, 60), right half white. Not square, so resize-shorter and centre crop are exercised."""
    img = np.full((48, 64, 3), 255, np.uint8)
    img[:, :32] = (20 + 9 * i, 120, 60)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **save)
    return buf.getvalue()


def coded_jpeg(i: int) -> bytes:
    """:func:`coded_image` as a JPEG of quality 95."""
    return coded_image(i, "JPEG", quality=95)
