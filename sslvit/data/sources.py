"""The map-style sources: digits (built in), an image folder, and a table of rows (parquet, arrow, the Hub).

Every source holds *undecoded* records and decodes them with :func:`sslvit.data.decode.decode`, so that a corrupt
record raises :class:`~sslvit.data.decode.BadSample` (a counted skip) instead of crashing a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel
from PIL import Image
from torch.utils.data import Dataset

from sslvit.data.decode import decode
from sslvit.data.folders import scan_folder
from sslvit.errors import DataError
from sslvit.recipe import DataConfig

log = logging.getLogger("sslvit")

DIGITS_SPLITS = ("train", "test")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")


class ImageSource(Dataset):
    """A map-style dataset of undecoded records; ``source[i]`` is ``load(i)``.

    Attributes:
        class_names: class names indexed by label, or None when unlabeled.
        labels: (N,) int64 labels of all records, read without decoding any image (-1 = none), or None.
        description: the source's identity for logs and evaluation JSON.
    """

    class_names: list[str] | None = None
    labels: np.ndarray | None = None
    description: str = ""
    _records: Any = ()  # indexable: file paths, a datasets.Dataset, an image array

    def __len__(self) -> int:
        return len(self._records)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Decode record ``index`` into ``(RGB image, label)``; label is -1 when unlabeled. Raises BadSample."""
        return decode(self._record(index)), self._label(index)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def _record(self, index: int) -> Any:
        return self._records[index]

    def _label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def _describe(self, where: str, split: str, note: str = "") -> str:
        classes = f"{len(self.class_names)} classes" if self.class_names is not None else "unlabeled"
        return f"{where} [{split}] {len(self)} images, {classes}{note}"


def digits_indices(split: str) -> np.ndarray:
    """The records of one split of scikit-learn's 1797 digits: a fixed 80/20 permutation."""
    if split not in DIGITS_SPLITS:
        raise DataError(f"digits has no split {split!r}; valid splits: {', '.join(DIGITS_SPLITS)}")
    order = np.random.default_rng(0).permutation(1797)  # fixed, so train and test never overlap across runs
    n_train = int(0.8 * len(order))
    return order[:n_train] if split == "train" else order[n_train:]


class DigitsSource(ImageSource):
    """scikit-learn's 8x8 digits as 32x32 RGB images (bicubic), labels 0-9: a dataset that needs no download."""

    def __init__(self, split: str):
        from sklearn.datasets import load_digits

        index = digits_indices(split)
        digits = load_digits()
        pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
        big = [Image.fromarray(p, "L").resize((32, 32), Image.Resampling.BICUBIC).convert("RGB") for p in pixels]
        self._records = np.stack([np.asarray(im) for im in big])
        self.labels = digits.target[index].astype(np.int64)
        self.class_names = [str(i) for i in range(10)]
        self.description = self._describe("digits", split)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self._records[index], "RGB"), self._label(index)


class FolderSource(ImageSource):
    """Image files under a folder: class subfolders (searched recursively) give labels; a flat folder is unlabeled.

    Symlinks are followed once (see :mod:`sslvit.data.folders`); those left out are counted in the description and
    named in a warning.
    """

    def __init__(self, root: Path, split: str):
        scan = scan_folder(root)
        self._records, self.labels, self.class_names = scan.files, scan.labels, scan.class_names
        self.links_not_followed = scan.links_not_followed
        self.description = self._describe(f"folder:{root}", split, scan.note())
        if scan.links_not_followed:
            shown = ", ".join(scan.links_not_followed[:3]) + ", ..." * (len(scan.links_not_followed) > 3)
            log.warning(
                "%s: %d symlink(s) lead to a folder or an image already counted (a loop or a second link), so each "
                "real image is counted once and they were not followed: %s",
                root,
                len(scan.links_not_followed),
                shown,
            )

    @property
    def files(self) -> list[str]:
        return self._records


def pick_columns(features: datasets.Features | None, cfg: DataConfig, where: str) -> tuple[str, str | None]:
    """Return (image column, label column or None) from the recipe or, when unset, from the features."""
    features = features or datasets.Features()
    columns = ", ".join(features) or "unknown"
    for key, value in (("data.image_column", cfg.image_column), ("data.label_column", cfg.label_column)):
        if value and features and value not in features:
            raise DataError(f"{key}={value!r} is not a column of {where}; columns: {columns}")
    image = cfg.image_column or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image is None:
        raise DataError(
            f"{where} has no column of type datasets.Image (columns: {columns}); "
            "set data.image_column to the column that holds the images"
        )
    label = cfg.label_column or next((c for c, f in features.items() if isinstance(f, ClassLabel)), None)
    return image, label or next((c for c in LABEL_COLUMN_NAMES if c in features), None)


def read_labels(ds: datasets.Dataset, column: str) -> tuple[np.ndarray, list[str]]:
    """All labels and the class names, read from Arrow so that no image is decoded; a null label becomes -1."""
    feature, values = ds.features[column], ds.with_format("arrow")[column]
    if isinstance(feature, ClassLabel):
        return pc.fill_null(values, -1).to_numpy().astype(np.int64), list(feature.names)
    if pa.types.is_integer(values.type):  # keep the ids as given so that every split agrees on them
        array = pc.fill_null(values, -1).to_numpy().astype(np.int64)
        return array, [str(i) for i in range(int(array.max(initial=-1)) + 1)]
    present = values.is_valid().to_numpy(zero_copy_only=False)
    strings = [str(v) for v in values.to_pylist()]
    names = sorted({s for s, ok in zip(strings, present) if ok})  # this split only: a ClassLabel pins them
    array = np.searchsorted(names, strings).astype(np.int64) if names else np.zeros(len(strings), dtype=np.int64)
    return np.where(present, array, -1), names


class TableSource(ImageSource):
    """Rows of a ``datasets.Dataset`` (parquet, arrow or the Hub); the image column is decoded here, not by datasets.

    Rows without a label (null, or -1 as ``datasets`` writes a missing ``ClassLabel``) are labelled -1: evaluation
    leaves them out. They are counted in ``unlabeled_rows``, the description and a warning.
    """

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, where: str, split: str):
        self.image_column, label_column = pick_columns(ds.features, cfg, where)
        self.labels, self.class_names = read_labels(ds, label_column) if label_column else (None, None)
        self.unlabeled_rows = 0 if self.labels is None else int((self.labels < 0).sum())
        # decode=False: we decode the bytes ourselves, so that a corrupt image is skipped instead of raising
        self._records = ds.select_columns([self.image_column]).cast_column(
            self.image_column, datasets.Image(decode=False)
        )
        note = f" ({self.unlabeled_rows} rows without a label in {label_column!r})" * bool(self.unlabeled_rows)
        self.description = self._describe(where, split, note)
        if self.unlabeled_rows:
            log.warning(
                "%s [%s]: %d of %d rows have no label in column %r (null or -1); evaluation leaves them out",
                where,
                split,
                self.unlabeled_rows,
                len(self),
                label_column,
            )

    def _record(self, index: int) -> Any:
        return self._records[int(index)][self.image_column]
