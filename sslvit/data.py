"""Image datasets for pretraining and evaluation, and the robust decode they all share.

``data.path`` picks the source (see :func:`open_source`): ``digits`` (built in), a folder of images, parquet/arrow
files in the Hugging Face layout, or a Hub dataset id. Every source holds *undecoded* records and decodes them
here, so a corrupt file becomes a counted :class:`Skipped` item in the batch instead of a crashed run.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import ClassLabel, load_dataset
from datasets.distributed import split_dataset_by_node
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from sslvit.errors import DataError
from sslvit.recipe import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TABLE_KINDS = ("parquet", "arrow")
DIGITS_SPLITS = ("train", "test")
# Folder names that mark splits rather than classes: a missing split must not silently read the parent folder.
SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test", "eval")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")


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


def _digits_indices(split: str) -> np.ndarray:
    if split not in DIGITS_SPLITS:
        raise DataError(f"digits has no split {split!r}; valid splits: {', '.join(DIGITS_SPLITS)}")
    order = np.random.default_rng(0).permutation(1797)  # fixed, so train and test never overlap across runs
    n_train = int(0.8 * len(order))
    return order[:n_train] if split == "train" else order[n_train:]


class DigitsSource(ImageSource):
    """scikit-learn's 8x8 digits as 32x32 RGB images (bicubic), labels 0-9: a dataset that needs no download."""

    def __init__(self, split: str):
        from sklearn.datasets import load_digits

        index = _digits_indices(split)
        digits = load_digits()
        pixels = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
        big = [Image.fromarray(p, "L").resize((32, 32), Image.Resampling.BICUBIC).convert("RGB") for p in pixels]
        self._records = np.stack([np.asarray(im) for im in big])
        self.labels = digits.target[index].astype(np.int64)
        self.class_names = [str(i) for i in range(10)]
        self.description = self._describe("digits", split)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self._records[index], "RGB"), self._label(index)


def _scan_folder(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None, int]:
    """Return (image files, labels or None, class names or None, number of other files ignored)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # loose files beside class folders belong to no class: ignore them (and count them) like the rest
    ignored = sum(1 for p in root.iterdir() if p.is_file()) if classes else 0
    files: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate([root / c for c in classes] or [root]):
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .ipynb_checkpoints
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, name))
                    labels.append(label)
                else:
                    ignored += 1
    if not files:
        raise DataError(f"no images in {root}; accepted extensions: {' '.join(IMAGE_EXTENSIONS)}")
    return files, (np.asarray(labels, dtype=np.int64) if classes else None), (classes or None), ignored


class FolderSource(ImageSource):
    """Image files under a folder: class subfolders (searched recursively) give labels; a flat folder is unlabeled."""

    def __init__(self, root: Path, split: str):
        self._records, self.labels, self.class_names, ignored = _scan_folder(root)
        self.description = self._describe(f"folder:{root}", split, f" ({ignored} other files ignored)" * bool(ignored))

    @property
    def files(self) -> list[str]:
        return self._records


def _pick_columns(features: datasets.Features | None, cfg: DataConfig, where: str) -> tuple[str, str | None]:
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


def _read_labels(ds: datasets.Dataset, column: str) -> tuple[np.ndarray, list[str]]:
    """All labels and the class names, read from Arrow so that no image is decoded."""
    feature, values = ds.features[column], ds.with_format("arrow")[column]
    if isinstance(feature, ClassLabel):
        return pc.fill_null(values, -1).to_numpy().astype(np.int64), list(feature.names)
    array = values.to_numpy()
    if np.issubdtype(array.dtype, np.integer):  # keep the ids as given so that every split agrees on them
        return array.astype(np.int64), [str(i) for i in range(int(array.max(initial=-1)) + 1)]
    names = sorted({str(v) for v in array})  # names of this split only: give the column a ClassLabel to pin them
    return np.searchsorted(names, [str(v) for v in array]).astype(np.int64), names


class TableSource(ImageSource):
    """Rows of a ``datasets.Dataset`` (parquet, arrow or the Hub); the image column is decoded here, not by datasets."""

    def __init__(self, ds: datasets.Dataset, cfg: DataConfig, where: str, split: str):
        self.image_column, label_column = _pick_columns(ds.features, cfg, where)
        self.labels, self.class_names = _read_labels(ds, label_column) if label_column else (None, None)
        # decode=False: we decode the bytes ourselves, so that a corrupt image is skipped instead of raising
        self._records = ds.select_columns([self.image_column]).cast_column(
            self.image_column, datasets.Image(decode=False)
        )
        self.description = self._describe(where, split)

    def _record(self, index: int) -> Any:
        return self._records[int(index)][self.image_column]


@dataclass
class _Plan:
    kind: str  # digits | folder | parquet | arrow | hub
    where: str  # the folder, file pattern or Hub id: what messages and descriptions name
    files: list[str] = field(default_factory=list)


def _table_splits(root: Path) -> list[str]:
    """Split names found in a folder in the Hugging Face layout (``train-*.parquet``, ``data/test-*.arrow``, ...)."""
    found, base = set(), glob.escape(str(root))
    for kind in TABLE_KINDS:
        for f in glob.glob(f"{base}/*-*.{kind}") + glob.glob(f"{base}/data/*-*.{kind}"):
            found.add(Path(f).name.split("-")[0])
        found.update(Path(f).parent.name for f in glob.glob(f"{base}/*/*.{kind}"))
    return sorted(found - {"data"})


def _folder_plan(root: Path, split: str) -> _Plan:
    for kind in TABLE_KINDS:
        for pattern in (f"{split}-*.{kind}", f"data/{split}-*.{kind}", f"{split}/*.{kind}"):
            files = sorted(glob.glob(f"{glob.escape(str(root))}/{pattern}"))
            if files:
                return _Plan(kind, f"{root}/{pattern}", files)
    splits = _table_splits(root)
    if splits:
        raise DataError(f"{root} has no split {split!r}; splits found: {', '.join(splits)}")
    if (root / split).is_dir():
        return _Plan("folder", str(root / split))
    split_folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SPLIT_FOLDER_NAMES)
    if split_folders:
        raise DataError(f"{root} has no {split!r} folder; splits found: {', '.join(split_folders)}")
    return _Plan("folder", str(root))


def _plan(cfg: DataConfig, split: str) -> _Plan:
    """Decide what ``cfg.path`` names, without reading any image."""
    path = cfg.path
    if path == "digits":
        return _Plan("digits", "digits")
    if not path:
        raise DataError(
            "data.path is empty; set it to digits, an image folder, parquet/arrow files or a Hub dataset id"
        )
    local = os.path.expanduser(path)
    kind = next((k for k in TABLE_KINDS if local.endswith("." + k)), None)
    if kind and any(c in local for c in "*?["):
        files = sorted(glob.glob(local))
        if not files:
            raise DataError(f"data.path {path} matches no files")
        return _Plan(kind, os.path.abspath(local), files)
    if os.path.isdir(local):
        return _folder_plan(Path(local).resolve(), split)
    if os.path.isfile(local):
        if not kind:
            raise DataError(f"data.path {path} is a file; give a folder, a .parquet/.arrow file or a glob of them")
        return _Plan(kind, os.path.abspath(local), [os.path.abspath(local)])
    # Hub ids look like "name" or "namespace/name": one "/" is allowed, anything more path-like is a local path.
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path):
        raise DataError(f"data.path {path} does not exist; give an existing folder or file, or 'digits'")
    return _Plan("hub", path)


def _load_hf(plan: _Plan, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    try:
        if plan.kind == "hub":
            return load_dataset(plan.where, split=split, streaming=streaming)
        return load_dataset(plan.kind, data_files=plan.files, split="train", streaming=streaming)
    except Exception as e:
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        if plan.kind == "hub":
            raise DataError(
                f"data.path {plan.where!r} is not a local file or folder, so it was read as a Hugging Face Hub "
                f"dataset id, and loading split {split!r} failed ({reason}); Hub datasets need network access, "
                "otherwise point data.path at a local copy"
            ) from e
        raise DataError(f"cannot read {plan.where} ({reason})") from e


def open_source(cfg: DataConfig, split: str | None = None) -> ImageSource:
    """Open the map-style image source that ``cfg.path`` names.

    Args:
        cfg: the data section of the recipe.
        split: which split to open; None means ``cfg.split``.

    Raises:
        DataError: the path does not exist, holds no images, has no such split, or the Hub cannot be reached.
    """
    split = split or cfg.split
    if cfg.streaming:
        raise DataError(
            "data.streaming=true is not supported by this command (it needs random access to the "
            "images); set data.streaming=false"
        )
    plan = _plan(cfg, split)
    if plan.kind == "digits":
        return DigitsSource(split)
    if plan.kind == "folder":
        return FolderSource(Path(plan.where), split)
    return TableSource(_load_hf(plan, split, streaming=False), cfg, f"{plan.kind}:{plan.where}", split)


def count_samples(cfg: DataConfig, split: str | None = None) -> int | None:
    """Count the records of a split without decoding any image; None when that needs network or streaming."""
    split = split or cfg.split
    if cfg.streaming:
        return None
    plan = _plan(cfg, split)
    if plan.kind == "digits":
        return len(_digits_indices(split))
    if plan.kind == "folder":
        return len(_scan_folder(Path(plan.where))[0])
    if plan.kind == "parquet":
        return sum(pq.read_metadata(f).num_rows for f in plan.files)  # row counts live in the file footers
    if plan.kind == "arrow":
        return sum(datasets.Dataset.from_file(f).num_rows for f in plan.files)  # memory-mapped, not read
    return None


@contextlib.contextmanager
def seeded_rng(*key: int, restore: bool = True) -> Iterator[None]:
    """Run the block with torch (CPU), numpy and python RNGs seeded from ``key``, then restore them.

    Augmentations drawn this way depend only on (seed, epoch, sample index): not on which worker decodes the
    sample, nor on batches skipped when a run resumes mid-epoch, nor on the main process's RNG (masking).
    ``restore=False`` leaves the three RNGs seeded: for a DataLoader worker, which draws from them nothing but
    the augmentations that reseed them first (saving and restoring numpy's state alone costs ~0.13 ms a sample).
    """
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class TransformedImages(Dataset):
    """``dataset[i]`` is ``(transform(rgb_image), label)``, or :class:`Skipped` when the record cannot be decoded.

    With ``seed`` set, each sample's augmentation is drawn from an RNG keyed by (seed, epoch, index), so a
    resumed run reproduces the uninterrupted one exactly; call :meth:`set_epoch` at the start of each epoch.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], Any], seed: int | None = None):
        self.source = source
        self.transform = transform
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # shared: persistent workers see set_epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, int] | Skipped:
        try:
            image, label = self.source.load(index)
        except BadSample as e:
            return Skipped(e.reason)
        if self.seed is None:
            return self.transform(image), label
        with seeded_rng(self.seed, int(self._epoch), index, restore=get_worker_info() is None):
            return self.transform(image), label


class StreamingImages(IterableDataset):
    """A streaming Hugging Face dataset yielding the items of :class:`TransformedImages`.

    Every record goes to exactly one (process, DataLoader worker) pair of the job. Build it with :func:`open_stream`;
    ``stream`` must yield ``image_column`` as ``datasets.Image(decode=False)`` dicts and ``label_column`` as ints.
    ``shuffle_buffer`` > 0 shuffles shard order and examples within a buffer of that size, from ``seed`` + epoch.
    """

    def __init__(self, stream: datasets.IterableDataset, transform: Callable[[Image.Image], Any], rank: int,
                 world_size: int, image_column: str, label_column: str | None, description: str = "",
                 shuffle_buffer: int = 0, seed: int = 0):  # fmt: skip
        self.stream, self.transform, self.rank, self.world_size = stream, transform, rank, world_size
        self.image_column, self.label_column, self.description = image_column, label_column, description
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # shared: persistent workers see set_epoch

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently in each epoch (the same way in every process)."""
        self._epoch.fill_(epoch)

    def __iter__(self) -> Iterator[tuple[Any, int] | Skipped]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # One flat split over (rank, worker). Iterating with .iter() keeps datasets from sharding by DataLoader
        # worker a second time on its own (its __iter__ does that inside workers, and by whole shards only).
        part = split_dataset_by_node(self.stream, self.rank * workers + worker, self.world_size * workers)
        if self.shuffle_buffer > 0:  # after the split: split_dataset_by_node drops a shuffle's per-epoch reseeding
            part = part.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            part.set_epoch(int(self._epoch))
        for batch in part.iter(batch_size=64):
            images = batch[self.image_column]
            for record, label in zip(images, batch[self.label_column] if self.label_column else [-1] * len(images)):
                try:
                    image = decode(record)
                except BadSample as e:
                    yield Skipped(e.reason)
                    continue
                yield self.transform(image), label if isinstance(label, int) else -1


def open_stream(cfg: DataConfig, split: str | None, transform: Callable[[Image.Image], Any], rank: int = 0,
                world_size: int = 1, *, shuffle_buffer: int = 0, seed: int = 0) -> StreamingImages:  # fmt: skip
    """Open parquet/arrow files or a Hub dataset as a stream for process ``rank`` of ``world_size``.

    Args:
        shuffle_buffer: > 0 shuffles the shard order and the examples within a buffer of this size (seeded).
    """
    split = split or cfg.split
    plan = _plan(cfg, split)
    if plan.kind in ("digits", "folder"):
        raise DataError(f"data.streaming=true needs parquet/arrow files or a Hub dataset; {plan.where} is neither: "
                        "set data.streaming=false")  # fmt: skip
    stream = _load_hf(plan, split, streaming=True)
    where = f"{plan.kind}:{plan.where}"
    image, label = _pick_columns(stream.features, cfg, where)
    stream = stream.select_columns([c for c in (image, label) if c]).cast_column(image, datasets.Image(decode=False))
    description = f"{where} [{split}] streaming"
    return StreamingImages(stream, transform, rank, world_size, image, label, description, shuffle_buffer, seed)


def collate_skipping(items: list[tuple[Any, int] | Skipped]) -> dict[str, Any]:
    """Batch the decoded items and count the skipped ones.

    Returns:
        ``views``: the default-collated views (a tensor, or a list of tensors for multi-crop), None when every item
        was skipped; ``labels``: (B,) int64; ``skipped``: reason -> count.
    """
    kept = [item for item in items if not isinstance(item, Skipped)]
    skipped = dict(Counter(item.reason for item in items if isinstance(item, Skipped)))
    if not kept:
        return {"views": None, "labels": torch.empty(0, dtype=torch.long), "skipped": skipped}
    views = default_collate([view for view, _ in kept])
    return {"views": views, "labels": torch.tensor([label for _, label in kept], dtype=torch.long), "skipped": skipped}


def resolve_num_workers(cfg: DataConfig) -> int:
    """``cfg.num_workers``, with -1 meaning min(8, CPU cores this process may use)."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool, cfg: DataConfig, seed: int
) -> DataLoader:
    """A DataLoader over ``dataset`` that batches with :func:`collate_skipping`.

    Shuffling is seeded (and so are the workers' seeds, which derive from the same generator). An iterable
    dataset is never shuffled here: a stream shuffles itself (see :func:`open_stream`).
    """
    workers = resolve_num_workers(cfg)
    generator = torch.Generator()
    generator.manual_seed(seed)
    # these two options are errors in DataLoader when there are no worker processes
    extra = {"persistent_workers": cfg.persistent_workers, "prefetch_factor": cfg.prefetch_factor} if workers else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not isinstance(dataset, IterableDataset),
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        generator=generator,
        **extra,
    )
