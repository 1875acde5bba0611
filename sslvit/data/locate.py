"""What ``data.path`` names, and opening it: :func:`open_source`, :func:`open_stream`, :func:`count_samples`.

``data.path`` is ``digits`` (built in), a folder of images, parquet/arrow files in the Hugging Face layout (a
folder, one file or a glob), or a Hub dataset id. A plan is made from the path alone, without reading any image.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import load_dataset
from PIL import Image

from sslvit.data.folders import scan_folder
from sslvit.data.loader import StreamingImages
from sslvit.data.sources import DigitsSource, FolderSource, ImageSource, TableSource, digits_indices, pick_columns
from sslvit.errors import DataError
from sslvit.recipe import DataConfig

TABLE_KINDS = ("parquet", "arrow")
# Folder names that mark splits rather than classes: a missing split must not silently read the parent folder.
SPLIT_FOLDER_NAMES = ("train", "val", "valid", "validation", "test", "eval")


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


def file_split(path: str) -> str | None:
    """The split a table file belongs to by its name (``test-00000-of-00001.parquet``, ``test_1.arrow``) or its
    folder (``test/0.parquet``), when that is one of :data:`SPLIT_FOLDER_NAMES`; else None."""
    name = Path(path).name.lower()
    for split in SPLIT_FOLDER_NAMES:
        if name.startswith((f"{split}-", f"{split}_", f"{split}.")):
            return split
    parent = Path(path).parent.name.lower()
    return parent if parent in SPLIT_FOLDER_NAMES else None


def _glob_plan(cfg: DataConfig, kind: str, local: str) -> _Plan:
    """The files a glob matches; files of two or more splits are an error unless ``data.mix_splits``."""
    files = sorted(glob.glob(local))
    if not files:
        raise DataError(f"data.path {cfg.path} matches no files")
    by_split: dict[str, list[str]] = {}
    for f in files:
        split = file_split(f)
        if split is not None:
            by_split.setdefault(split, []).append(f)
    if len(by_split) > 1 and not cfg.mix_splits:
        found = "; ".join(f"{split}: {len(fs)} ({Path(fs[0]).name}, ...)" for split, fs in sorted(by_split.items()))
        example = next(iter(sorted(by_split)))
        raise DataError(
            f"data.path {cfg.path} matches the files of {len(by_split)} splits ({found}); name one split's files "
            f"(e.g. data.path={os.path.dirname(cfg.path) or '.'}/{example}-*.{kind}) or the folder that holds them "
            "(data.split picks the split), or set data.mix_splits=true to read them all"
        )
    return _Plan(kind, os.path.abspath(local), files)


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
        return _glob_plan(cfg, kind, local)
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
        DataError: the path does not exist, holds no images, has no such split, is a glob over several splits,
            or the Hub cannot be reached.
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
        return len(digits_indices(split))
    if plan.kind == "folder":
        return len(scan_folder(Path(plan.where)).files)
    if plan.kind == "parquet":
        return sum(pq.read_metadata(f).num_rows for f in plan.files)  # row counts live in the file footers
    if plan.kind == "arrow":
        return sum(datasets.Dataset.from_file(f).num_rows for f in plan.files)  # memory-mapped, not read
    return None


def open_stream(
    cfg: DataConfig,
    split: str | None,
    transform: Callable[[Image.Image], Any],
    rank: int = 0,
    world_size: int = 1,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
) -> StreamingImages:
    """Open parquet/arrow files or a Hub dataset as a stream for process ``rank`` of ``world_size``.

    Args:
        shuffle_buffer: > 0 shuffles the shard order and the examples within a buffer of this size (seeded).
    """
    split = split or cfg.split
    plan = _plan(cfg, split)
    if plan.kind in ("digits", "folder"):
        raise DataError(
            f"data.streaming=true needs parquet/arrow files or a Hub dataset; {plan.where} is neither: "
            "set data.streaming=false"
        )
    stream = _load_hf(plan, split, streaming=True)
    where = f"{plan.kind}:{plan.where}"
    image, label = pick_columns(stream.features, cfg, where)
    stream = stream.select_columns([c for c in (image, label) if c]).cast_column(image, datasets.Image(decode=False))
    description = f"{where} [{split}] streaming"
    return StreamingImages(stream, transform, rank, world_size, image, label, description, shuffle_buffer, seed)
