"""Evaluation speed and memory: k-NN against DINO's own k-NN, the ImageNet-sized k-NN, cached vs re-encoding probe.

Prints one JSON object per measurement (see BENCHMARKS.md, "Evaluation speed and memory"):

- ``knn``: sslvit's k-NN (:func:`sslvit.evaluation.knn.knn_predict`, faiss) against ``knn_classifier`` of
  facebookresearch/dino ``eval_knn.py`` (transcribed below) on synthetic L2-normalised features, 50,000 train x
  10,000 test, 10 classes; DINO's default ks (10, 20, 100, 200): the reference runs once per k, as its script does,
  sslvit answers every k from one search. Reports wall times (also per k), top-1 agreement of the predictions per k
  and the peak resident memory of each method.
- ``knn_imagenet`` (``--imagenet``, not in the suite): 1.28 M x 768 train, 1000 classes, ``--queries`` queries;
  sslvit only. Peak resident memory against twice the feature matrices.
- ``linear_probe``: the MAE-protocol probe on cached CIFAR-10 features (``sslvit.evaluation.features`` cache,
  ``linear.linear_probe``) against the same probe re-running the encoder over the training images every epoch.

Memory: every k-NN measurement runs in a fresh subprocess of this script; ``peak_rss_mib`` is that process's
``ru_maxrss`` (resident high-water mark), ``rss_before_mib`` its resident size once the synthetic features exist
(they are written in place, chunk by chunk, so making them never exceeds what they occupy).

    python benchmarks/eval_speed.py --suite cpu           # the `make bench` share (about 3 min, quiet 2 cores)
    python benchmarks/eval_speed.py --knn --dim 768       # one k-NN comparison
    python benchmarks/eval_speed.py --imagenet --queries 5000
    python benchmarks/eval_speed.py --probe --train-limit 5000 --test-limit 1000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
DINO_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


# Transcribed from facebookresearch/dino eval_knn.py ``knn_classifier`` at commit
# 04c0ad957c9fd04cced6d703668bc049586d1d21 (Copyright (c) Facebook, Inc. and its affiliates; Apache License 2.0).
# The only addition: ``predictions_out`` collects each chunk's top-5 ranking, for the agreement check.
@torch.no_grad()
def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000,
                        predictions_out=None):  # fmt: skip
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        # get the features for test images
        features = test_features[idx : min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx : min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]

        # calculate the dot product and compute top-k neighbors
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)

        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        _, predictions = probs.sort(1, True)
        if predictions_out is not None:
            predictions_out.append(predictions[:, : min(5, k)].clone())

        # find the predictions that match the target
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()  # top5 does not make sense if k < 5
        total += targets.size(0)
    top1 = top1 * 100.0 / total
    top5 = top5 * 100.0 / total
    return top1, top5


def synthetic_features(n: int, means: torch.Tensor, noise: float, seed: int,
                       chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``n`` L2-normalised features around class means ``means: (C, D)``, written in place chunk by chunk.

    Returns:
        ``(features (n, D) float32, labels (n,) int64)``; labels are uniform over the C classes.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(means), (n,), generator=generator)
    features = torch.empty(n, means.shape[1])
    for start in range(0, n, chunk):
        block = features[start : start + chunk]
        torch.randn(block.shape, generator=generator, out=block)
        block.mul_(noise / means.shape[1] ** 0.5).add_(means[labels[start : start + chunk]])
        block.div_(torch.linalg.vector_norm(block, dim=1, keepdim=True))
    return features, labels


def knn_problem(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0) -> dict[str, Any]:
    """Train and test features sharing class means: unit-norm means plus noise of norm ``1.4 * dim ** 0.25``.

    The noise grows with the dimension as the chance similarity (``dim ** -0.5``) shrinks, so 20-NN top-1 stays far
    from 0 and from 100% (about 70% at dim 192 and 80% at 768 with 10 classes).
    """
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5
    train, train_labels = synthetic_features(n_train, means, 1.4 * dim**0.25, seed + 1)
    test, test_labels = synthetic_features(n_test, means, 1.4 * dim**0.25, seed + 2)
    return {"train": train, "train_labels": train_labels, "test": test, "test_labels": test_labels,
            "num_classes": classes}  # fmt: skip


def run_sslvit(problem: dict[str, Any], ks: list[int],
               single_k: bool = True) -> tuple[dict[int, torch.Tensor], dict[str, float]]:  # fmt: skip
    """sslvit's k-NN: every k from one search. Returns per-k top-5 rankings and wall times (all ks; k=20 alone)."""
    from sslvit.evaluation.knn import knn_predict

    args = (problem["train"], problem["train_labels"], problem["test"])
    start = time.perf_counter()
    ranked = knn_predict(*args, ks, TEMPERATURE, problem["num_classes"])
    times = {"all_ks": time.perf_counter() - start}
    if single_k and 20 in ks and len(ks) > 1:  # the single-k cost, for the like-for-like ratio with one reference call
        start = time.perf_counter()
        knn_predict(*args, [20], TEMPERATURE, problem["num_classes"])
        times["k20"] = time.perf_counter() - start
    return ranked, times


def run_dino(problem: dict[str, Any], ks: list[int]) -> tuple[dict[int, torch.Tensor], dict[str, float]]:
    """The reference, called once per k as its ``__main__`` does. Returns per-k top-5 rankings and wall times."""
    ranked, times = {}, {}
    for k in ks:
        chunks: list[torch.Tensor] = []
        start = time.perf_counter()
        dino_knn_classifier(problem["train"], problem["train_labels"], problem["test"], problem["test_labels"], k,
                            TEMPERATURE, problem["num_classes"], chunks)  # fmt: skip
        times[f"k{k}"] = time.perf_counter() - start
        ranked[k] = torch.cat(chunks)
    times["all_ks"] = sum(times.values())
    return ranked, times


def accuracy(ranked: dict[int, torch.Tensor], labels: torch.Tensor) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 (%) per k from ``(Q, min(5, k))`` rankings."""
    hits = {k: r.eq(labels.view(-1, 1)) for k, r in ranked.items()}
    percent = lambda hit: round(100 * hit.float().mean().item(), 3)  # noqa: E731
    return {k: {"top1": percent(h[:, 0]), "top5": percent(h.any(1))} for k, h in hits.items()}


def worker(spec: dict[str, Any]) -> None:
    """One measurement in this (fresh) process: make the features, run one method, save rankings, print JSON."""
    torch.set_num_threads(spec["threads"])
    problem = knn_problem(spec["n_train"], spec["n_test"], spec["dim"], spec["classes"])
    if spec.get("unnormalised"):  # rows of norms 0.5-3, scaled in place: sslvit must normalise them itself
        problem["train"].mul_(torch.linspace(0.5, 3.0, spec["n_train"]).view(-1, 1))
    if spec["method"] == "sslvit":  # its libraries (faiss, its BLAS) count in the baseline, not in the search
        import sslvit.evaluation.knn  # noqa: F401
    rss_before = psutil.Process().memory_info().rss / 2**20
    if spec["method"] == "sslvit":
        ranked, times = run_sslvit(problem, spec["ks"], single_k=spec.get("single_k", True))
    else:
        ranked, times = run_dino(problem, spec["ks"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    torch.save(ranked, spec["out"])
    print(json.dumps({"wall_s": {k: round(v, 3) for k, v in times.items()}, "rss_before_mib": round(rss_before),
                      "peak_rss_mib": round(peak), "accuracy": accuracy(ranked, problem["test_labels"])}))  # fmt: skip


def in_subprocess(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Run :func:`worker` in a fresh interpreter (so ``ru_maxrss`` is this measurement's); its JSON and rankings."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": str(Path(tmp) / "ranked.pt")}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{spec['method']} measurement failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]), torch.load(spec["out"], weights_only=True)


def agreement(ours: dict[int, torch.Tensor], ref: dict[int, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per k: % of queries with the same top-1 class, and with the same top-5 ranking."""
    return {str(k): {"top1_pct": round(100 * ours[k][:, 0].eq(ref[k][:, 0]).float().mean().item(), 4),
                "top5_ranking_pct": round(100 * ours[k].eq(ref[k]).all(1).float().mean().item(), 4)}
            for k in ref}  # fmt: skip


def features_mib(*shapes: tuple[int, int]) -> float:
    return sum(rows * cols * 4 for rows, cols in shapes) / 2**20


def bench_knn(dim: int, n_train: int, n_test: int, classes: int, ks: list[int], threads: int,
              repeats: int = 1) -> dict[str, Any]:  # fmt: skip
    """sslvit vs the DINO reference on one synthetic problem, each in its own process, alternated ``repeats`` times.

    Wall times are medians over the repeats; memory, accuracy and rankings come from the first pair.
    """
    spec = {"dim": dim, "n_train": n_train, "n_test": n_test, "classes": classes, "ks": ks, "threads": threads}
    runs = {"dino_reference": [], "sslvit": []}
    for _ in range(repeats):
        for method, results in runs.items():
            results.append(in_subprocess({**spec, "method": method}))
    (ref, ref_ranked), (ours, ours_ranked) = runs["dino_reference"][0], runs["sslvit"][0]
    for results in runs.values():
        first = results[0][0]
        first["wall_s"] = {key: round(statistics.median(r["wall_s"][key] for r, _ in results), 3)
                           for key in first["wall_s"]}  # fmt: skip
    result = {"benchmark": "knn", **spec, "repeats": repeats, "features_mib": round(features_mib((n_train, dim),
              (n_test, dim))), "sslvit": ours, "dino_reference": ref,
              "speedup_all_ks": round(ref["wall_s"]["all_ks"] / ours["wall_s"]["all_ks"], 2),
              "agreement": agreement(ours_ranked, ref_ranked)}  # fmt: skip
    if "k20" in ours["wall_s"] and "k20" in ref["wall_s"]:
        result["speedup_k20_alone"] = round(ref["wall_s"]["k20"] / ours["wall_s"]["k20"], 2)
    return result


def bench_imagenet(queries: int, threads: int, ks: list[int], unnormalised: bool = False) -> dict[str, Any]:
    """The ImageNet-sized k-NN (1.28 M x 768 train, 1000 classes), sslvit only: peak memory vs the features.

    ``unnormalised``: the bank's rows get norms from 0.5 to 3 (as raw CLS features have), so sslvit normalises them.
    """
    n_train, dim = 1_281_167, 768
    spec = {"dim": dim, "n_train": n_train, "n_test": queries, "classes": 1000, "ks": ks, "threads": threads,
            "unnormalised": unnormalised, "single_k": False}  # fmt: skip
    ours, _ = in_subprocess({**spec, "method": "sslvit"})
    size = features_mib((n_train, dim), (queries, dim))
    full = features_mib((n_train, dim), (50_000, dim))
    return {"benchmark": "knn_imagenet", **spec, "features_mib": round(size), "sslvit": ours,
            "peak_over_features": round(ours["peak_rss_mib"] / size, 3),
            "peak_over_features_at_50k_queries": round(ours["peak_rss_mib"] / full, 3),
            "extrapolated_wall_s_at_50k_queries": round(ours["wall_s"]["all_ks"] * 50_000 / queries, 1)}  # fmt: skip


def encode_all(encoder: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """CLS features (after the final norm, as the cache stores them) of ``images: (N, 3, H, W)``."""
    from sslvit.evaluation.features import encode

    return torch.cat([encode(encoder, images[s : s + batch])["cls"].float() for s in range(0, len(images), batch)])


def reencoding_probe(encoder: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                     cfg: Any) -> dict[str, float]:  # fmt: skip
    """The baseline: :func:`sslvit.evaluation.linear.linear_probe` step for step (same split, heads, optimizer,
    schedule and batch order), but the encoder re-runs over every training image at each epoch instead of reading
    cached features; the held-out and test images are encoded once at the end. Images come decoded (not timed).
    """
    from sslvit.evaluation import linear as L

    hp = cfg.resolved()
    (images, labels), (test_images, test_labels) = train, test
    train_rows, val_rows = L.split_train_val(labels, cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    heads = L.LinearHeads(encoder.embed_dim, num_classes, len(hp["lr_grid"]), hp["batchnorm"])
    fit_images, y = images[train_rows], labels[train_rows]
    batch = L.features_batch_size(len(fit_images), hp["batch_size"])
    steps_per_epoch, lrs = len(fit_images) // batch, [base * batch / 256 for base in hp["lr_grid"]]
    optimizer = L.make_optimizer(heads, lrs, hp)
    scheduler = L.make_scheduler(
        optimizer, steps_per_epoch * hp["epochs"], round(steps_per_epoch * hp["warmup_epochs"])
    )
    generator, step = torch.Generator().manual_seed(hp["seed"]), 0
    heads.train()
    for _ in range(hp["epochs"]):
        x = encode_all(encoder, fit_images)  # what the cache saves: the encoder over every image, every epoch
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps_per_epoch):
            rows = order[i * batch : (i + 1) * batch]
            scheduler.step_update(step)
            loss = L.heads_loss(heads(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    val_acc = L.head_accuracy(heads, encode_all(encoder, images[val_rows]), labels[val_rows])
    test_acc = L.head_accuracy(heads, encode_all(encoder, test_images), test_labels)
    best = int(val_acc[:, 0].argmax())
    return {"top1": float(test_acc[best, 0]), "val_top1": float(val_acc[best, 0])}


def bench_probe(data: Path, n_train: int, n_test: int, epochs: int) -> dict[str, Any]:
    """MAE-protocol probe of a random vit_tiny (32 px, patch 4) on CIFAR-10: cached features vs re-encoding."""
    if not data.is_dir():
        return {"benchmark": "linear_probe", "skipped": f"no CIFAR-10 copy at {data}"}
    from sslvit.data import open_source
    from sslvit.evaluation.features import balanced_subset, cached_features, eval_loader
    from sslvit.evaluation.linear import LinearConfig, linear_probe
    from sslvit.evaluation.load import load_encoder
    from sslvit.recipe import DataConfig
    from sslvit.views import eval_transform

    torch.manual_seed(0)
    encoder, identity = load_encoder("vit_tiny_patch16_224", "random", model_args={"img_size": 32, "patch_size": 4})
    data_cfg, cfg = DataConfig(path=str(data), num_workers=0), LinearConfig(protocol="mae", epochs=epochs)
    sources = {"train": (open_source(data_cfg, "train"), n_train), "test": (open_source(data_cfg, "test"), n_test)}
    options = {"crop_pct": 1.0, "batch_size": 256, "cfg": data_cfg, "accelerator": None}
    timings, feats = {}, {}
    with tempfile.TemporaryDirectory() as cache:
        for attempt in ("extract_s", "cache_hit_s"):  # first run fills the cache, the second reads it
            start = time.perf_counter()
            for split, (source, limit) in sources.items():
                feats[split], info = cached_features(encoder, identity, source, split, limit=limit, **options,
                                                     cache_dir=Path(cache))  # fmt: skip
            if attempt == "cache_hit_s":
                assert info["cache"] == "hit", info
                cached = linear_probe(feats["train"], feats["test"], 10, cfg)["metrics"]
            timings[attempt] = time.perf_counter() - start
    decoded = {}
    for split, (source, limit) in sources.items():  # decoded once, untimed: the baseline pays only the encoder
        loader = eval_loader(source, balanced_subset(source.labels, limit), eval_transform(32, 1.0), 32, 256,
                             data_cfg, None)  # fmt: skip
        batches = list(loader)
        decoded[split] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    assert torch.equal(decoded["train"][1], feats["train"].labels)
    start = time.perf_counter()
    baseline = reencoding_probe(encoder, decoded["train"], decoded["test"], 10, cfg)
    baseline_s = time.perf_counter() - start
    probe_s = timings["cache_hit_s"]
    return {"benchmark": "linear_probe", "data": "cifar10", "encoder": "vit_tiny (random init), 32 px, patch 4",
            "protocol": "mae", "epochs": epochs, "train_images": len(feats["train"]), "test_images": len(feats["test"]),
            "heads": len(cfg.grid()), "cached_s": round(probe_s, 2), "extract_once_s": round(timings["extract_s"], 2),
            "reencode_every_epoch_s": round(baseline_s, 2), "speedup_cached": round(baseline_s / probe_s, 1),
            "speedup_incl_extraction": round(baseline_s / (timings["extract_s"] + probe_s), 2),
            "cached_top1": round(cached["top1"], 2), "reencode_top1": round(baseline["top1"], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu"], help="cpu: k-NN at dim 192 and 768, and the linear probe")
    parser.add_argument("--knn", action="store_true", help="one k-NN comparison (--dim, --train, --queries)")
    parser.add_argument("--imagenet", action="store_true", help="the ImageNet-sized k-NN (about 15 min on 2 cores)")
    parser.add_argument("--probe", action="store_true", help="cached vs re-encoding linear probe on CIFAR-10")
    parser.add_argument("--dim", type=int, nargs="+", default=[192, 768])
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=None, help="k-NN queries (default 10,000; ImageNet 50,000)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, nargs="+", default=list(DINO_KS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--unnormalised", action="store_true", help="--imagenet: a bank that is not unit-norm")
    parser.add_argument("--repeats", type=int, default=1, help="k-NN: alternate reference/sslvit runs, median times")
    parser.add_argument("--train-limit", type=int, default=2000, help="probe: CIFAR-10 training images")
    parser.add_argument("--test-limit", type=int, default=500, help="probe: CIFAR-10 test images")
    parser.add_argument("--epochs", type=int, default=3, help="probe epochs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if not (args.suite or args.knn or args.imagenet or args.probe):
        parser.error("choose --suite cpu, --knn, --imagenet or --probe")
    machine = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {args.threads}",
               "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    if args.suite or args.knn:
        for dim in args.dim:
            emit(bench_knn(dim, args.train, args.queries or 10_000, args.classes, args.k, args.threads, args.repeats),
                 machine)  # fmt: skip
    if args.imagenet:
        emit(bench_imagenet(args.queries or 50_000, args.threads, args.k, args.unnormalised), machine)
    if args.suite or args.probe:
        emit(bench_probe(CIFAR10, args.train_limit, args.test_limit, args.epochs), machine)


def emit(result: dict[str, Any], machine: dict[str, Any]) -> None:
    print(json.dumps({**result, **machine, "load_avg_1m_after": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
