"""From records to batches: the augmented views of each record, seeded per sample, and a loader that skips and
counts the records that fail to decode."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from sslvit.data.augment import RawViews, collate_raw
from sslvit.data.decode import BadSample, Skipped, decode
from sslvit.data.seeding import seeded_rng
from sslvit.recipe import DataConfig

if TYPE_CHECKING:
    from sslvit.data.sources import ImageSource


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

    Every record goes to exactly one (process, DataLoader worker) pair of the job. Build it with
    :func:`sslvit.data.open_stream`; ``stream`` must yield ``image_column`` as ``datasets.Image(decode=False)`` dicts
    and ``label_column`` as ints. ``shuffle_buffer`` > 0 shuffles shard order and examples within a buffer of that
    size, from ``seed`` + epoch.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        transform: Callable[[Image.Image], Any],
        rank: int,
        world_size: int,
        image_column: str,
        label_column: str | None,
        description: str = "",
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
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
    views = [view for view, _ in kept]
    views = collate_raw(views) if isinstance(views[0], RawViews) else default_collate(views)
    return {"views": views, "labels": torch.tensor([label for _, label in kept], dtype=torch.long), "skipped": skipped}


def resolve_num_workers(cfg: DataConfig, device: torch.device | None = None) -> int:
    """``cfg.num_workers``, with -1 meaning min(8, CPU cores this process may use), one fewer when the model
    trains on the CPU (``device`` cpu): the training process needs a core, and workers on every core slow it
    (DINO's CIFAR config on 2 cores: 1 worker 1.05x the bare step, 2 workers 0.67x; docs/data.md)."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores) - 1 if device is not None and device.type == "cpu" else min(8, cores)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    cfg: DataConfig,
    seed: int,
    device: torch.device | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` that batches with :func:`collate_skipping`.

    Shuffling is seeded (and so are the workers' seeds, which derive from the same generator). An iterable
    dataset is never shuffled here: a stream shuffles itself (see :func:`sslvit.data.open_stream`). ``device``
    (the training device) only sizes ``data.num_workers=-1`` (:func:`resolve_num_workers`).
    """
    workers = resolve_num_workers(cfg, device)
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
