"""Decode once: a small dataset's images decoded a single time and kept as RGB pixels in shared memory.

CIFAR-10's parquet files hold PNG bytes: decoding them again every epoch costs ~0.1 ms an image, CPU that a small
machine shares with the training step and that a GPU run's loader needs (it is about a fifth of a CIFAR MAE
sample's loading cost). With ``data.decode_cache_mb`` set, every image is decoded once at the start into one
uint8 array (CIFAR-10 train: 50,000 x 32 x 32 x 3 = 147 MiB) that forked DataLoader workers share copy-on-write
(not torch shared memory: containers often give /dev/shm only 64 MiB). The pixels are exactly those
:func:`sslvit.data.decode` returns, so training is bit-identical with or without the cache; a record that fails
to decode stays a counted skip.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from PIL import Image

from sslvit.data import BadSample, ImageSource
from sslvit.errors import DataError

log = logging.getLogger("sslvit")


class DecodedSource(ImageSource):
    """``source`` with every image decoded up front; ``load(i)`` returns the same image without decoding.

    Raises:
        DataError: the decoded images need more than ``limit_mb`` MiB (checked on the first image, then as it goes).
    """

    def __init__(self, source: ImageSource, limit_mb: int) -> None:
        self.labels, self.class_names = source.labels, source.class_names
        self.description = f"{source.description}, decoded once into memory"
        self._records = range(len(source))
        start, limit = time.perf_counter(), limit_mb * 2**20
        arrays: list[np.ndarray] = []
        self.failed: dict[int, str] = {}  # index -> why it could not be decoded
        used = 0
        for index in range(len(source)):
            try:
                pixels = np.asarray(source.load(index)[0], dtype=np.uint8)
            except BadSample as e:
                self.failed[index], pixels = e.reason, np.zeros((0, 0, 3), dtype=np.uint8)
            used += pixels.size
            if used > limit or (index == 0 and pixels.size * len(source) > limit):
                need = max(used, pixels.size * len(source)) / 2**20
                raise DataError(
                    f"the decoded images of {source.description} need about {need:.0f} MiB, more than "
                    f"data.decode_cache_mb={limit_mb} (raise it to keep them decoded in memory)"
                )
            arrays.append(pixels)
        self.shapes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
        self.offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(np.int64)
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype=np.uint8)
        self.pixels = flat
        log.info("decoded %d images once into %.0f MiB in %.1f s", len(self), used / 2**20, time.perf_counter() - start)

    def load(self, index: int) -> tuple[Image.Image, int]:
        index = int(index)
        if index in self.failed:
            raise BadSample(self.failed[index])
        (height, width), start = self.shapes[index], self.offsets[index]
        pixels = self.pixels[start : self.offsets[index + 1]].reshape(height, width, 3)
        return Image.fromarray(pixels, "RGB"), self._label(index)


def maybe_decoded(source: ImageSource, limit_mb: int) -> ImageSource:
    """``source`` decoded once into memory when it fits in ``limit_mb`` > 0 MiB (``data.decode_cache_mb``), else itself.

    A cap, not a demand: a recipe can turn the cache on for its usual data set (the CIFAR recipes do) and still
    train on a larger one, decoded every epoch, with a warning.
    """
    if limit_mb <= 0:
        return source
    try:
        return DecodedSource(source, limit_mb)
    except DataError as e:
        log.warning("%s; decoding every epoch instead", e)
        return source
