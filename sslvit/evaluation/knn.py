"""Weighted k-NN classification on frozen features, the DINO protocol.

[0]: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), 2021,
https://arxiv.org/abs/2104.14294, section 4.1 and appendix; reference code: facebookresearch/dino ``eval_knn.py``
(``knn_classifier``) at commit 04c0ad957c9fd04cced6d703668bc049586d1d21.

Features are L2-normalised; each test image takes its k nearest training images by cosine similarity, and each
neighbour votes for its class with weight ``exp(sim / T)`` (T = 0.07). Deliberate deviations from the reference:

- the neighbours come from faiss (``IndexFlatIP``, exact, on all GPUs when faiss has them) rather than a dense
  ``test @ train.T`` matmul; queries go in chunks so only ``(chunk, max k)`` results exist at a time, never the full
  similarity matrix (1.28 M x 50 k floats would be 256 GB);
- every k is answered from one search for the largest k (the nearest k are the first k of the nearest max k).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU-feature probe at INFO

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sslvit.backbone import input_size  # noqa: E402
from sslvit.evaluation.features import balanced_subset, default_crop_pct, extract_features  # noqa: E402
from sslvit.recipe import DataConfig  # noqa: E402

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
HEADLINE_K = 20  # DINO's reported k


def build_index(train_features: torch.Tensor) -> faiss.Index:
    """An exact inner-product index over ``train_features: (N, D)`` (already L2-normalised), on GPU if possible."""
    index = faiss.IndexFlatIP(train_features.shape[1])
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(train_features.float().cpu().numpy()))
    return index


def weighted_votes(similarity: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                   temperature: float) -> torch.Tensor:  # fmt: skip
    """Class scores from neighbours: ``sum_j exp(sim_j / T) * onehot(label_j)``.

    Args:
        similarity: (Q, k) cosine similarity of each query's neighbours.
        neighbour_labels: (Q, k) their class ids.

    Returns:
        (Q, num_classes) scores.
    """
    weights = (similarity / temperature).exp()
    scores = torch.zeros(similarity.shape[0], num_classes, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                 chunk_size: int = 4096) -> dict[int, dict[str, float]]:  # fmt: skip
    """Top-1 / top-5 accuracy (in %) of DINO's weighted k-NN for every k in ``ks``, from one search.

    Args:
        train_features: (N, D) features of the labelled bank (normalised here).
        train_labels: (N,) int64 class ids.
        test_features: (Q, D) query features (normalised here).
        test_labels: (Q,) int64 class ids.
        ks: numbers of neighbours; each must be at most N.
        num_classes: None = ``max(label) + 1``.
        chunk_size: queries per search; memory is ``chunk_size x max(ks)``, never ``Q x N``.

    Returns:
        ``{k: {"top1": float, "top5": float}}``; top-5 counts the first ``min(5, k)`` predictions, as DINO does.
    """
    ks = sorted(set(int(k) for k in ks))
    if ks[0] < 1 or ks[-1] > len(train_features):
        raise ValueError(f"k must be between 1 and the number of training features ({len(train_features)}); got {ks}")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train = torch.nn.functional.normalize(train_features.float(), dim=1)
    test = torch.nn.functional.normalize(test_features.float(), dim=1)
    index = build_index(train)
    train_labels = train_labels.cpu().long()
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, len(test), chunk_size):
        queries = np.ascontiguousarray(test[start : start + chunk_size].cpu().numpy())
        similarity, neighbours = (torch.from_numpy(a) for a in index.search(queries, ks[-1]))
        targets = test_labels[start : start + chunk_size].cpu().view(-1, 1)
        for k in ks:
            scores = weighted_votes(similarity[:, :k], train_labels[neighbours[:, :k]], num_classes, temperature)
            # a full descending sort, as the reference does, so that ties among unvoted classes break the same way
            ranked = scores.sort(dim=1, descending=True).indices[:, : min(5, k)]
            hits = ranked.eq(targets)
            correct[k] += torch.stack([hits[:, :1].sum(), hits.sum()])
    n = max(len(test), 1)
    return {k: {"top1": 100.0 * c[0].item() / n, "top5": 100.0 * c[1].item() / n} for k, c in correct.items()}


def knn_eval(encoder: torch.nn.Module, train_source: Any, test_source: Any, *, ks: Sequence[int] = (HEADLINE_K,),
             temperature: float = DEFAULT_TEMPERATURE, crop_pct: float | None = None,
             limit_train: int | None = 5000, limit_test: int | None = 1000, batch_size: int = 256,
             accelerator: Any = None, data_cfg: Any = None) -> dict[str, Any]:  # fmt: skip
    """A quick k-NN of ``encoder`` as it is now, for an online monitor during pretraining (nothing is cached).

    Every process must call it (extraction is sharded over processes); pass the unwrapped encoder, in any mode
    (it is restored afterwards). Class-balanced subsets keep it cheap.

    Args:
        encoder: a timm ViT.
        train_source: labelled :class:`sslvit.data.ImageSource` for the bank; test_source: the queries.
        crop_pct: None = :func:`~sslvit.evaluation.features.default_crop_pct` at the encoder's resolution.
        data_cfg: loader options (workers); None = ``DataConfig(num_workers=0)``.

    Returns:
        ``top1``, ``top5`` (in %) at the first k, that ``k``, ``per_k`` (every k), ``num_train``, ``num_test``.
    """
    img_size = input_size(encoder)
    options = {"img_size": img_size, "crop_pct": crop_pct or default_crop_pct(img_size), "batch_size": batch_size,
               "cfg": data_cfg or DataConfig(num_workers=0), "accelerator": accelerator}  # fmt: skip
    train, _ = extract_features(encoder, train_source, balanced_subset(train_source.labels, limit_train), **options)
    test, _ = extract_features(encoder, test_source, balanced_subset(test_source.labels, limit_test), **options)
    num_classes = len(train_source.class_names or []) or None
    ks = [min(k, len(train)) for k in ks]
    per_k = knn_classify(train.cls, train.labels, test.cls, test.labels, ks, temperature, num_classes)
    return {**per_k[ks[0]], "k": ks[0], "per_k": per_k, "num_train": len(train), "num_test": len(test)}
