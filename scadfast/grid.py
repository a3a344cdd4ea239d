"""Image grids: generator output tensors to PNG files people can look at."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] (clamped) → (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, 3, H, W) images in [-1, 1] into one (H', W', 3) uint8 array, ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"make_grid: expected (N, 3, H, W) images, got {tuple(images.shape)}")
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = arr[i]
    return out


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Save a PNG grid atomically (a reader never sees a half-written file)."""
    from PIL import Image

    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(make_grid(images, nrow)).save(buf, format="PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
