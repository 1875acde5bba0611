"""The robust decode every source shares: any image mode to 8-bit RGB, and every way a record can fail.

A record that cannot be decoded raises :class:`BadSample`; the datasets in :mod:`sslvit.data.loader` turn it into
a :class:`Skipped` item, which :func:`~sslvit.data.loader.collate_skipping` drops from the batch and counts.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadSample(Exception):
    """One record cannot be decoded. Not a :class:`UserError`: the loader skips the record and counts ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Skipped:
    """Stands in for a record that failed to decode; :func:`collate_skipping` drops it and counts ``reason``."""

    reason: str


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` upright (EXIF orientation) as 8-bit RGB; transparent pixels are composited onto white."""
    with contextlib.suppress(Exception):  # a broken EXIF block must not cost an otherwise good image
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        # keep the top byte of each 16-bit value (what most viewers show); astype folds big-endian into native order
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        # 32-bit int/float images have no fixed range: stretch the range this image uses onto 0..255
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes | str | os.PathLike | dict[str, Any] | None) -> Image.Image:
    """Decode encoded image bytes, a file path, or a ``datasets.Image(decode=False)`` dict into an RGB image.

    Raises:
        BadSample: the record is missing, empty, truncated or not a readable image; ``reason`` says which.
    """
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    if data is None:
        raise BadSample("no image data")
    if not isinstance(data, bytes | bytearray | memoryview):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            raise BadSample(f"unreadable file ({type(e).__name__})") from e
    if len(data) == 0:
        raise BadSample("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # open() reads only the header: force the pixels so that a corrupt file fails here, not later
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise BadSample("decompression bomb") from e
    except UnidentifiedImageError as e:
        raise BadSample("not an image") from e
    except Exception as e:  # decoders raise OSError, ValueError, SyntaxError, struct.error, ... on bad data
        if "truncated" in str(e).lower():
            raise BadSample("truncated image") from e
        raise BadSample(f"decode error ({type(e).__name__})") from e
