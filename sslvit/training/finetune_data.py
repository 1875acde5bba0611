"""The fine-tuning data: MAE's augmentation (timm ``create_transform``) and DeiT's repeated-augmentation sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Subset

from sslvit.data import ImageSource, TransformedImages, make_loader
from sslvit.errors import DataError
from sslvit.recipe import DataConfig

if TYPE_CHECKING:
    from sslvit.training.finetune import FinetuneConfig


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, except 0 bits gives the black image that Pillow < 13 gave (Pillow 13 raises).

    timm's ``PosterizeIncreasing`` asks for 0 bits whenever RandAugment's magnitude is clipped to 10, which
    ``mstd0.5`` around ``m9`` does for ~2% of ops: without this, fine-tuning crashes a few hundred images in.
    """
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep) if bits_to_keep > 0 else Image.new(img.mode, img.size)


def train_transform(img_size: int, cfg: FinetuneConfig) -> Any:
    """MAE's fine-tuning augmentation: random-resized crop, flip, RandAugment, random erasing (timm)."""
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        scale=(cfg.scale_min, 1.0),
        hflip=cfg.hflip,
        color_jitter=None,
        auto_augment=cfg.auto_augment or None,
        interpolation="bicubic",
        re_prob=cfg.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    for step in transform.transforms:
        for op in step.ops if isinstance(step, RandAugment) else []:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _train_loader(
    source: ImageSource, indices: np.ndarray, img_size: int, cfg: FinetuneConfig, data_cfg: DataConfig, world_size: int
) -> Any:
    """Shuffled, augmented batches of ``source[indices]`` (drop_last: Mixup needs full, even batches).

    With ``cfg.repeated_aug`` > 1, timm's ``RepeatAugSampler`` (DeiT's ``RASampler``) draws each epoch: a shuffle,
    each image repeated ``repeated_aug`` times in a row, cut to the dataset's length rounded down to 256 images.
    """
    images = _Images(TransformedImages(source, train_transform(img_size, cfg)), indices.tolist())
    loader = make_loader(
        images, cfg.batch_size_per_device, shuffle=cfg.repeated_aug == 1, drop_last=True, cfg=data_cfg, seed=cfg.seed
    )
    if cfg.repeated_aug > 1:
        loader = _with_sampler(loader, _SeededRepeatAugSampler(images, cfg.repeated_aug, cfg.seed))
    if len(loader) < cfg.accum_steps * world_size:
        raise DataError(
            f"{len(indices)} training images make less than one step of {cfg.batch_size_per_device} x "
            f"{world_size} process(es) x {cfg.accum_steps}; lower --batch-size"
        )
    return loader


class _Images(Subset):
    """``Subset`` with the ``set_epoch`` that the training loop's :func:`~sslvit.training.loop.micro_batches` calls.

    The fine-tuning augmentations are not seeded per sample (``TransformedImages`` without a seed), so the epoch
    changes nothing in them; resume is at epoch boundaries, where the sampler's seed makes the order exact.
    """

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class _SeededRepeatAugSampler(RepeatAugSampler):
    """timm's ``RepeatAugSampler`` for one stream, with the run's seed in its shuffle (timm seeds it by epoch alone).

    One replica on purpose: Accelerate's ``prepare`` shards this stream's batches across processes, so a sampler
    that also split by rank would shard twice. A ViT has no BatchNorm, so the copies of an image meet in one global
    batch either way, as in DeiT, where each copy goes to another GPU.
    """

    def __init__(self, dataset: Subset, num_repeats: int, seed: int):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, num_repeats=num_repeats)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(self.seed * 1_000_003 + epoch)


def _with_sampler(loader: DataLoader, sampler: RepeatAugSampler) -> DataLoader:
    """``loader`` rebuilt around ``sampler`` (a DataLoader cannot swap its sampler once built)."""
    extra = {"persistent_workers": loader.persistent_workers, "prefetch_factor": loader.prefetch_factor}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        generator=loader.generator,
        **(extra if loader.num_workers else {}),
    )
