"""Images out: model-space samples in [-1, 1] to files (PNG, WebP, npy) and small previews."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

OutputFormat = Literal["png", "webp", "npy"]
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "npy": "application/x-npy"}


def to_unit_range(samples: np.ndarray) -> np.ndarray:
    """[n, C, H, W] samples in [-1, 1] → float32 [n, H, W, C] in [0, 1] (clamped)."""
    if samples.ndim != 4:
        raise ValueError(f"expected samples [n, C, H, W], got shape {samples.shape}")
    pixels = (samples.astype(np.float32, copy=False) + 1.0) * 0.5
    return np.clip(pixels, 0.0, 1.0).transpose(0, 2, 3, 1)


def _pil(pixels: np.ndarray) -> Image.Image:
    """[H, W, C] in [0, 1] with C in {1, 3, 4} → an 8-bit PIL image (round to nearest)."""
    channels = pixels.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"PNG/WebP need 1, 3 or 4 channels, got {channels}")
    data = np.rint(pixels * 255.0).astype(np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def encode_image(pixels: np.ndarray, fmt: OutputFormat) -> bytes:
    """One [H, W, C] image in [0, 1] as a `png`, `webp` (lossless) or `npy` (float32) file."""
    if fmt == "npy":
        return _npy(pixels)
    buf = io.BytesIO()
    if fmt == "png":
        _pil(pixels).save(buf, format="PNG")
    elif fmt == "webp":
        _pil(pixels).save(buf, format="WEBP", lossless=True)
    else:
        raise ValueError(f"output format must be one of png, webp, npy; got {fmt!r}")
    return buf.getvalue()


def encode_stack_npy(pixels: np.ndarray) -> bytes:
    """All of a request's images [n, H, W, C] as one float32 npy file."""
    return _npy(pixels)


def preview_png(pixels: np.ndarray, max_side: int) -> bytes:
    """A small PNG of one [H, W, C] image: box-downsampled so its longer side is ≤ max_side."""
    height, width = pixels.shape[:2]
    factor = max(1, -(-max(height, width) // max_side))
    if factor > 1:
        h, w = height // factor, width // factor
        pixels = (
            pixels[: h * factor, : w * factor].reshape(h, factor, w, factor, -1).mean(axis=(1, 3))
        )
    return encode_image(pixels, "png")
