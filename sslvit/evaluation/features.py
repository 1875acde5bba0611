"""Frozen-encoder features for evaluation: extraction (batched, distributed) and an on-disk cache.

For every image the encoder runs once in eval mode on the evaluation transform (Resize + CenterCrop at the encoder's
resolution, :func:`sslvit.views.eval_transform`) and three features are kept, all taken after the encoder's final
norm, as MAE's and DINO's evaluation code take them:

- ``cls``: (N, D) the CLS token of the last block (MAE's linear probe; k-NN; timm's ``forward``),
- ``patch_mean``: (N, D) the mean of the last block's patch tokens (DINO's ``--avgpool_patchtokens``),
- ``cls_blocks``: (N, n, D) the CLS token of each of the last n = 4 blocks, oldest first (DINO's linear probe).

Crop: ``crop_pct`` 0.875 (Resize to img_size / 0.875, then CenterCrop) is the ImageNet convention; for images of
64 px and less (CIFAR, digits at 32 px) it would throw away an eighth of an already tiny image and blur the rest, so
:func:`default_crop_pct` uses 1.0 there (the whole image, resized to the eval resolution). ``--crop-pct`` overrides.

Features are cached as ``<cache_dir>/<key>.pt`` (plain tensors, read back with ``weights_only=True``); the key hashes
the encoder's weights hash, the data identity (description + labels), the split, the limit and the transform, so a
second k-NN or linear probe on the same encoder and data extracts nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sslvit.data import ImageSource, Skipped, TransformedImages, open_source, resolve_num_workers
from sslvit.errors import DataError
from sslvit.recipe import DataConfig
from sslvit.views import eval_transform

log = logging.getLogger("sslvit.evaluation")

CACHE_VERSION = 1  # bump when what is stored, or how it is computed, changes
N_BLOCKS = 4
TEST_SPLITS = ("test", "val", "validation")


def default_cache_dir() -> Path:
    """``$SSLVIT_CACHE/features``, else ``$XDG_CACHE_HOME/sslvit/features``, else ``~/.cache/sslvit/features``."""
    if os.environ.get("SSLVIT_CACHE"):
        return Path(os.environ["SSLVIT_CACHE"]) / "features"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sslvit" / "features"


def default_crop_pct(img_size: int) -> float:
    """1.0 (no crop) for images of 64 px and less, ImageNet's 0.875 above (see the module docstring)."""
    return 1.0 if img_size <= 64 else 0.875


@dataclass
class Features:
    """Features of one split, sorted by record index.

    Attributes:
        cls: (N, D) CLS token of the last block after the final norm.
        patch_mean: (N, D) mean of the last block's patch tokens after the final norm.
        cls_blocks: (N, n, D) CLS token of each of the last n blocks after the final norm, oldest first.
        labels: (N,) int64 class ids.
        indices: (N,) int64 record indices in the source (undecodable records are absent).
    """

    cls: torch.Tensor
    patch_mean: torch.Tensor
    cls_blocks: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def balanced_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of a deterministic class-balanced subset of ``limit`` labelled records, sorted.

    Each class's records are shuffled with ``seed``, then classes are taken round-robin, so every class gets
    ``limit // C`` records (or all it has, the rest going to the larger classes). Records labelled -1 are left out.

    Args:
        labels: (N,) int class ids, -1 = unlabelled.
        limit: how many to keep; None keeps every labelled record.
    """
    labelled = np.flatnonzero(labels >= 0)
    if limit is None or limit >= len(labelled):
        return labelled
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(labelled[labels[labelled] == c]) for c in np.unique(labels[labelled])]
    depth = max(len(p) for p in per_class)
    # round r takes the r-th record of every class that still has one
    order = [p[r] for r in range(depth) for p in per_class if r < len(p)]
    return np.sort(np.asarray(order[:limit], dtype=np.int64))


def open_labelled(cfg: DataConfig, train_split: str, test_split: str | None) -> tuple[ImageSource, ImageSource, str]:
    """Open the train and test splits of a labelled source; ``test_split=None`` tries test, val, validation.

    Returns:
        ``(train source, test source, name of the test split)``.

    Raises:
        DataError: a split is missing, has no labels, the two splits are the same images, or their classes differ.
    """
    train = open_source(cfg, train_split)
    test = None
    for split in [test_split] if test_split else TEST_SPLITS:
        try:
            test, test_split = open_source(cfg, split), split
            break
        except DataError:
            if test_split:
                raise
    if test is None:
        raise DataError(f"{cfg.path} has no test split (tried {', '.join(TEST_SPLITS)}); name it with --test-split")
    for source in (train, test):
        if source.labels is None or not (source.labels >= 0).any():
            raise DataError(
                f"evaluation needs labels, and {source.description} has none: give a folder with one subfolder per "
                "class, or a table with a label column (--label-column)"
            )
    if train.description.replace(f"[{train_split}]", "") == test.description.replace(f"[{test_split}]", ""):
        raise DataError(
            f"{cfg.path} has no separate {train_split!r} and {test_split!r} splits (both read the same images); "
            "give a folder with train/ and test/ subfolders, name the splits with --train-split/--test-split, or hold "
            "out a seeded fraction of the images as the test set with --holdout 0.2"
        )
    if train.class_names != test.class_names:
        raise DataError(f"the {train_split} and {test_split} splits of {cfg.path} have different classes: "
                        f"{train.class_names[:10]} vs {test.class_names[:10]}")  # fmt: skip
    return train, test, test_split


def holdout_split(source: ImageSource, fraction: float, seed: int = 0) -> tuple[ImageSource, ImageSource]:
    """A labelled source without separate splits (a plain class folder) split into train and held-out test views.

    Each class's records are shuffled with ``seed`` and ``round(fraction * n)`` of them (at least one, and at least
    one left for training, when a class has two or more) go to the test view. Both views are the same source with
    the other view's labels set to -1, which every evaluation leaves out (see :func:`balanced_subset`), and a
    description that names the split, so cached features of the two never mix.

    Raises:
        DataError: the source has no labels.
    """
    if source.labels is None or not (source.labels >= 0).any():
        raise DataError(f"--holdout needs labels, and {source.description} has none")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(source.labels), dtype=bool)
    for c in np.unique(source.labels[source.labels >= 0]):
        members = rng.permutation(np.flatnonzero(source.labels == c))
        n_test = min(max(round(fraction * len(members)), 1), len(members) - 1) if len(members) > 1 else 0
        test[members[:n_test]] = True
    views = []
    for name, keep in (("train", ~test), ("test", test)):
        view = copy.copy(source)
        view.labels = np.where(keep, source.labels, -1).astype(np.int64)
        view.description = f"{source.description} (holdout {fraction:g} seed {seed}: {name} part)"
        views.append(view)
    return views[0], views[1]


class _EvalImages(Dataset):
    """``(image, label, record index, decoded ok)``; an undecodable record becomes a zero image flagged not ok.

    Keeping every batch full (instead of dropping bad records like ``collate_skipping``) keeps Accelerate's
    ``gather_for_metrics`` exact: it trims the padding of the last batch by counting samples.
    """

    def __init__(self, source: ImageSource, indices: np.ndarray, transform: Any, img_size: int):
        self.images, self.indices, self.img_size = TransformedImages(source, transform), indices, img_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        index = int(self.indices[i])
        item = self.images[index]
        if isinstance(item, Skipped):  # ok is an int, not a bool: gloo cannot all-gather bool tensors
            return torch.zeros(3, self.img_size, self.img_size), -1, index, 0
        return item[0], item[1], index, 1


def eval_loader(source: ImageSource, indices: np.ndarray, transform: Any, img_size: int, batch_size: int,
                cfg: DataConfig, accelerator: Accelerator | None) -> DataLoader:  # fmt: skip
    """An in-order loader of ``(images, labels, indices, ok)`` batches, sharded over the processes.

    Uses ``prepare_data_loader`` rather than ``accelerator.prepare`` so that an evaluation during training does not
    register an extra loader in the training state that ``save_state`` writes.
    """
    workers = resolve_num_workers(cfg)
    loader = DataLoader(_EvalImages(source, indices, transform, img_size), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=cfg.pin_memory and torch.cuda.is_available())  # fmt: skip
    if accelerator is None:
        return loader
    return prepare_data_loader(loader, accelerator.device, accelerator.num_processes, accelerator.process_index,
                               put_on_device=True, even_batches=True)  # fmt: skip


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, n_blocks: int = N_BLOCKS) -> dict[str, torch.Tensor]:
    """Features of ``images: (B, 3, H, W)``: ``cls`` (B, D), ``patch_mean`` (B, D), ``cls_blocks`` (B, n, D).

    ``n`` is ``min(n_blocks, depth)``; every token is taken after the final norm (timm ``forward_intermediates``).
    An encoder without blocks of tokens (a DINO-trained CNN, Swin, ...) gives its pooled feature for all three, n = 1.
    """
    if not isinstance(encoder, VisionTransformer):
        pooled = encoder(images)  # (B, D): timm's num_classes=0 forward
        return {"cls": pooled, "patch_mean": pooled, "cls_blocks": pooled[:, None]}
    n = min(n_blocks, len(encoder.blocks))
    if not encoder.num_prefix_tokens:  # no class token (I-JEPA): timm's pooled output stands in for it
        final, blocks = encoder.forward_intermediates(images, indices=n, norm=True, output_fmt="NLC")
        pooled = encoder.forward_head(final, pre_logits=True)
        return {"cls": pooled, "patch_mean": pooled, "cls_blocks": torch.stack([t.mean(dim=1) for t in blocks], 1)}
    final, blocks = encoder.forward_intermediates(images, indices=n, norm=True, return_prefix_tokens=True,
                                                  output_fmt="NLC")  # fmt: skip
    prefix = encoder.num_prefix_tokens
    return {
        "cls": final[:, 0],
        "patch_mean": encoder.fc_norm(final[:, prefix:].mean(dim=1)),  # fc_norm is Identity for CLS-pool encoders
        "cls_blocks": torch.stack([tokens[:, 0] for _, tokens in blocks], dim=1),
    }


def extract_features(encoder: torch.nn.Module, source: ImageSource, indices: np.ndarray, *, img_size: int,
                     crop_pct: float, batch_size: int, cfg: DataConfig, accelerator: Accelerator | None = None,
                     n_blocks: int = N_BLOCKS) -> tuple[Features, int]:  # fmt: skip
    """Run the frozen encoder over ``source[indices]``, every process on its shard, gathered without duplicates.

    Args:
        indices: (M,) record indices to encode.
        batch_size: images per process per forward pass.
        accelerator: shards the work and gathers it; None runs on the encoder's device in this process.

    Returns:
        ``(features sorted by record index, number of undecodable records left out)``; every process gets them.
    """
    device = accelerator.device if accelerator else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval().to(device)
    loader = eval_loader(source, indices, eval_transform(img_size, crop_pct), img_size, batch_size, cfg, accelerator)
    world = accelerator.num_processes if accelerator else 1
    capacity = len(loader) * batch_size * world  # an upper bound on the rows gathered
    store: dict[str, torch.Tensor] = {}
    filled = 0
    main = accelerator is None or accelerator.is_local_main_process
    for images, labels, index, ok in tqdm(loader, desc="features", disable=not main or len(loader) < 10, leave=False):
        images = images.to(device, non_blocking=True)
        with accelerator.autocast() if accelerator else torch.autocast(device.type, enabled=False):
            out = {k: v.float() for k, v in encode(encoder, images, n_blocks).items()}
        out.update(labels=labels.to(device), indices=index.to(device), ok=ok.to(device))
        if accelerator is not None:
            out = accelerator.gather_for_metrics(out)
        # preallocated once: small per-batch tensors kept between large transient activations fragment the CPU heap
        # (measured: ~65 KB of resident memory per image instead of the 4.6 KB it stores)
        store = store or {k: torch.empty((capacity, *v.shape[1:]), dtype=v.dtype) for k, v in out.items()}
        for key, value in out.items():
            store[key][filled : filled + len(value)] = value.cpu()
        filled += len(out["ok"])
    encoder.train(was_training)
    if not filled:
        raise DataError(f"{source.description}: nothing to encode")
    merged = {k: v[:filled] for k, v in store.items()}
    ok = merged.pop("ok").bool()
    # sort by record index, keeping each record once: the result is the same for any number of processes
    unique, first = _first_occurrence(merged["indices"])
    keep = first[ok[first]]
    feats = Features(**{k: v[keep] for k, v in merged.items()})
    return feats, int(len(unique) - len(keep))


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the position of each one's first occurrence in ``values``."""
    unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
    positions = torch.arange(len(values))
    first = torch.full((len(unique),), len(values), dtype=torch.long).scatter_reduce(0, inverse, positions, "amin")
    return unique, first


def data_identity(source: ImageSource, split: str, limit: int | None) -> dict[str, Any]:
    """What the features were computed on: the source's description, a hash of its labels, split and limit."""
    labels = np.ascontiguousarray(source.labels if source.labels is not None else np.zeros(0, dtype=np.int64))
    return {"description": source.description, "split": split, "limit": limit, "num_records": len(source),
            "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()[:16]}  # fmt: skip


def feature_key(encoder_sha: str, data: dict[str, Any], img_size: int, crop_pct: float, n_blocks: int) -> str:
    """The cache key: a hash of everything that changes the features."""
    tree = {"version": CACHE_VERSION, "encoder": encoder_sha, "data": data, "n_blocks": n_blocks,
            "transform": {"resize": round(img_size / crop_pct), "center_crop": img_size, "interpolation": "bicubic",
                          "normalize": "imagenet"}}  # fmt: skip
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:24]


def cached_features(encoder: torch.nn.Module, identity: dict[str, Any], source: ImageSource, split: str, *,
                    limit: int | None, crop_pct: float, batch_size: int, cfg: DataConfig,
                    accelerator: Accelerator | None, cache_dir: Path | None
                    ) -> tuple[Features, dict[str, Any]]:  # fmt: skip
    """Features of a (class-balanced, limited) split, read from the cache or extracted and written to it.

    Args:
        identity: from :func:`sslvit.evaluation.load.load_encoder` (``sha256`` and ``img_size`` are used).
        cache_dir: where ``<key>.pt`` files live; None disables the cache.

    Returns:
        ``(features, info)``; info holds the data identity, ``cache`` (``hit``, ``extracted`` or ``off``), the cache
        file and the number of undecodable records skipped.
    """
    data = data_identity(source, split, limit)
    key = feature_key(identity["sha256"], data, identity["img_size"], crop_pct, N_BLOCKS)
    file = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    info = {"data": data, "cache_file": str(file) if file else None}
    if file is not None and file.is_file():
        stored = torch.load(file, map_location="cpu", weights_only=True)
        return Features(**stored["features"]), {**info, "cache": "hit", "skipped": stored["skipped"]}
    indices = balanced_subset(source.labels, limit)
    feats, skipped = extract_features(encoder, source, indices, img_size=identity["img_size"], crop_pct=crop_pct,
                                      batch_size=batch_size, cfg=cfg, accelerator=accelerator)  # fmt: skip
    if skipped:
        log.warning("%s: %d undecodable image(s) left out", source.description, skipped)
    if file is not None and (accelerator is None or accelerator.is_main_process):
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")
        torch.save({"features": feats.to_dict(), "skipped": skipped, "key": key}, tmp)
        tmp.replace(file)  # atomic: a reader never sees half a file
    return feats, {**info, "cache": "extracted" if file else "off", "skipped": skipped}
