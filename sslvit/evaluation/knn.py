"""Weighted k-NN classification on frozen features, the DINO protocol.

[0]: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), 2021,
https://arxiv.org/abs/2104.14294, section 4.1 and appendix; reference code: facebookresearch/dino ``eval_knn.py``
(``knn_classifier``) at commit 04c0ad957c9fd04cced6d703668bc049586d1d21.

Features are L2-normalised; each test image takes its k nearest training images by cosine similarity, and each
neighbour votes for its class with weight ``exp(sim / T)`` (T = 0.07). Deliberate deviations from the reference:

- the neighbours come from faiss (``faiss.knn``: exact inner products, blocked BLAS and a heap; an ``IndexFlatIP``
  on all GPUs when faiss has them) rather than a dense ``test @ train.T`` matmul and ``topk``; queries go in chunks
  and only the ``(queries, max k)`` results are kept, never the full similarity matrix (1.28 M x 50 k floats would
  be 256 GB);
- every k is answered from one search for the largest k (the nearest k are the first k of the nearest max k);
- the bank is never copied: a unit-norm bank is searched in place, any other is normalised block by block during the
  search (see :func:`searcher`); ``benchmarks/eval_speed.py`` measures time and peak memory against the reference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU-feature probe at INFO

import faiss  # noqa: E402
import torch  # noqa: E402

from sslvit.backbone import input_size  # noqa: E402
from sslvit.evaluation.features import balanced_subset, default_crop_pct, extract_features  # noqa: E402
from sslvit.recipe import DataConfig  # noqa: E402

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
HEADLINE_K = 20  # DINO's reported k
BLOCK_BYTES = 256 * 2**20  # a bank that is not unit-norm is normalised this much at a time, never copied whole


def as_float_rows(features: torch.Tensor) -> torch.Tensor:
    """``features: (N, D)`` as contiguous CPU float32, the caller's own memory when it already is (no copy)."""
    return features.detach().to("cpu", torch.float32).contiguous()


def is_unit(rows: torch.Tensor, chunk: int = 65536, tolerance: float = 1e-5) -> bool:
    """Whether every row of ``rows: (N, D)`` has an L2 norm within ``tolerance`` of 1 (checked chunk by chunk)."""
    norms = (torch.linalg.vector_norm(rows[s : s + chunk], dim=1) for s in range(0, len(rows), chunk))
    return all(bool(((n - 1).abs() <= tolerance).all()) for n in norms)


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """``features: (N, D)`` with rows of unit L2 norm: the input itself when they already are, else a copy."""
    rows = as_float_rows(features)
    return rows if is_unit(rows) else torch.nn.functional.normalize(rows, dim=1)


def searcher(train: torch.Tensor) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """A function ``(queries (Q, D) unit rows, k) -> (similarity, index) (Q, k)``: exact cosine search of ``train``.

    - CPU, unit-norm bank (DINO's reference normalises before its k-NN; so may a caller): ``faiss.knn`` searches the
      bank's own memory; an ``IndexFlatIP`` would hold a second copy (3.9 GB for 1.28 M x 768).
    - CPU, any other bank: each search walks it in blocks of ``BLOCK_BYTES``, normalised on the fly, and merges the
      blocks' results in a ``faiss.ResultHeap``; normalising costs ``1 / (2 x queries)`` of the search's work.
    - GPUs (when faiss has them): an ``IndexFlatIP`` on all of them, filled block by block.

    Args:
        train: (N, D) contiguous CPU float32 bank (:func:`as_float_rows`), normalised or not.
    """
    block = max(BLOCK_BYTES // (4 * train.shape[1]), 1)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(train.shape[1]))
        for _, rows in _normalised_blocks(train, block):
            index.add(rows.numpy())

        def on_gpus(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            similarity, neighbours = index.search(queries.numpy(), k)
            return torch.from_numpy(similarity), torch.from_numpy(neighbours)

        return on_gpus
    if is_unit(train):
        return functools.partial(_faiss_knn, bank=train)

    def blockwise(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for start, rows in _normalised_blocks(train, block):
            similarity, neighbours = _faiss_knn(queries, min(k, len(rows)), rows)
            heap.add_result(similarity.numpy(), neighbours.numpy() + start)
        heap.finalize()
        return torch.from_numpy(heap.D), torch.from_numpy(heap.I)

    return blockwise


def _normalised_blocks(train: torch.Tensor, block: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, those rows L2-normalised)`` for each run of ``block`` rows of ``train``."""
    for start in range(0, len(train), block):
        yield start, torch.nn.functional.normalize(train[start : start + block], dim=1)


def _faiss_knn(queries: torch.Tensor, k: int, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``faiss.knn`` by inner product on the tensors' own memory: ``(Q, k)`` similarities and bank rows, best first."""
    similarity, neighbours = faiss.knn(queries.numpy(), bank.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(similarity), torch.from_numpy(neighbours)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                num_classes: int | None = None, chunk_size: int = 4096) -> dict[int, torch.Tensor]:  # fmt: skip
    """DINO's weighted k-NN ranking of the classes for every k in ``ks``, from one exact search at the largest k.

    Args:
        train_features: (N, D) features of the labelled bank (normalised here unless they already are).
        train_labels: (N,) int64 class ids.
        test_features: (Q, D) query features (normalised here unless they already are).
        ks: numbers of neighbours; each must be at most N.
        num_classes: None = ``max(train label) + 1``.
        chunk_size: queries per search; memory is ``Q x max(ks)`` results (12 bytes each), never ``Q x N``.

    Returns:
        ``{k: (Q, min(5, k)) int64}``: each query's classes, best first.
    """
    ks = sorted(set(int(k) for k in ks))
    if ks[0] < 1 or ks[-1] > len(train_features):
        raise ValueError(f"k must be between 1 and the number of training features ({len(train_features)}); got {ks}")
    num_classes = num_classes or int(train_labels.max()) + 1
    search, test = searcher(as_float_rows(train_features)), unit_rows(test_features)
    train_labels = train_labels.cpu().long()
    ranked: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())  # one thread setting for the whole evaluation
    try:  # every search first, then every vote: faiss's and torch's OpenMP pools do not take turns on the cores
        found = [search(test[start : start + chunk_size], ks[-1]) for start in range(0, len(test), chunk_size)]
    finally:
        faiss.omp_set_num_threads(threads)
    for similarity, neighbours in found:
        weights, labels = (similarity / temperature).exp(), train_labels[neighbours]  # once, for every k
        for k in ks:
            scores = torch.zeros(len(labels), num_classes).scatter_add_(1, labels[:, :k], weights[:, :k])
            # a full descending sort, as the reference does, so that ties among unvoted classes break the same way;
            # clone: a slice would keep the whole (chunk, num_classes) int64 ranking alive (1.7 GB at ImageNet size)
            ranked[k].append(scores.sort(dim=1, descending=True).indices[:, : min(5, k)].clone())
    return {k: torch.cat(r) for k, r in ranked.items()}


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                 chunk_size: int = 4096) -> dict[int, dict[str, float]]:  # fmt: skip
    """Top-1 / top-5 accuracy (in %) of DINO's weighted k-NN for every k in ``ks``, from one search.

    Arguments as :func:`knn_predict`; ``test_labels``: (Q,) int64 class ids (``num_classes`` None = the largest
    label of either split + 1).

    Returns:
        ``{k: {"top1": float, "top5": float}}``; top-5 counts the first ``min(5, k)`` predictions, as DINO does.
    """
    test_labels = test_labels.cpu().long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    ranked = knn_predict(train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size)
    n = max(len(test_labels), 1)
    hits = {k: r.eq(test_labels.view(-1, 1)) for k, r in ranked.items()}
    return {k: {"top1": 100.0 * h[:, 0].sum().item() / n, "top5": 100.0 * h.sum().item() / n} for k, h in hits.items()}


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
