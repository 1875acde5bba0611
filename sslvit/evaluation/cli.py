"""Command lines of ``eval/knn.py``, ``eval/linear_probe.py`` and ``eval/finetune.py`` (also ``sslvit knn`` ...).

Each loads the encoder (:mod:`sslvit.evaluation.load`), opens the labelled train/test splits, runs its protocol,
prints a short table and writes a JSON report: encoder identity (path + weights hash), data identity, protocol,
every hyperparameter, metrics (``top1``/``top5``) and wall time. ``--json-out`` defaults to
``<run>/eval/<kind>.json`` when the encoder lives in a run folder, else ``./eval_<kind>.json``.

A randomly initialised encoder (the baseline every pretrained encoder should beat) is a timm name with
``--weights random`` and its shape in ``--model-args``, e.g.
``--encoder vit_tiny_patch16_224 --weights random --model-args img_size=32 patch_size=4``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslvit.evaluation.options import (
    _add_set,
    _parse_model_args,
    _parser,
    _wants_recipe_list,
    check_json_out,
    check_options,
)

KINDS = {"knn": "k-NN", "linear_probe": "linear probe", "finetune": "fine-tuning"}


@dataclass
class Setup:
    """What every evaluation starts from."""

    encoder: Any
    identity: dict[str, Any]
    train: Any
    test: Any
    test_split: str
    data_cfg: Any
    crop_pct: float
    started: float


def _setup(args: argparse.Namespace, started: float) -> Setup:
    from sslvit.data import open_source
    from sslvit.evaluation.features import default_crop_pct, holdout_split, open_labelled
    from sslvit.evaluation.load import load_encoder
    from sslvit.recipe import DataConfig

    check_options(args)
    data_cfg = DataConfig(
        path=args.data, image_column=args.image_column, label_column=args.label_column, num_workers=args.num_workers
    )
    if args.holdout is not None:
        train, test = holdout_split(open_source(data_cfg, args.train_split), args.holdout, args.seed)
        test_split = f"{args.train_split} holdout"
    else:
        train, test, test_split = open_labelled(data_cfg, args.train_split, args.test_split)
    encoder, identity = load_encoder(args.encoder, args.weights, args.img_size, _parse_model_args(args.model_args))
    check_json_out(json_out_path(args.kind, identity, args.json_out))
    crop_pct = args.crop_pct or default_crop_pct(identity["img_size"])
    return Setup(encoder, identity, train, test, test_split, data_cfg, crop_pct, started)


def _features(setup: Setup, args: argparse.Namespace, accelerator: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Cached features of both splits and the data identity for the report."""
    from sslvit.evaluation.features import cached_features, default_cache_dir

    cache_dir = None if args.no_cache else Path(args.cache_dir or default_cache_dir())
    common = dict(crop_pct=setup.crop_pct, batch_size=args.batch_size, cfg=setup.data_cfg, cache_dir=cache_dir)
    extract = functools.partial(cached_features, setup.encoder, setup.identity, accelerator=accelerator, **common)
    train, train_info = extract(setup.train, args.train_split, limit=args.limit_train)
    test, test_info = extract(setup.test, setup.test_split, limit=args.limit_test)
    return train, test, _data_report(setup, args, len(train), len(test), train_info, test_info)


def _data_report(setup: Setup, args, n_train: int, n_test: int, train_info=None, test_info=None) -> dict[str, Any]:
    out = {
        "path": args.data,
        "train": setup.train.description,
        "test": setup.test.description,
        "num_classes": len(setup.train.class_names),
        "train_size": n_train,
        "test_size": n_test,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "holdout": None if args.holdout is None else {"fraction": args.holdout, "seed": args.seed},
        "img_size": setup.identity["img_size"],
        "crop_pct": setup.crop_pct,
        "transform": f"Resize({round(setup.identity['img_size'] / setup.crop_pct)}, "
        f"bicubic) + CenterCrop({setup.identity['img_size']}) + ImageNet normalisation",
    }
    if train_info:
        out["train_identity"], out["test_identity"] = train_info["data"], test_info["data"]
        out["feature_cache"] = {
            "train": train_info["cache"],
            "test": test_info["cache"],
            "train_file": train_info["cache_file"],
            "test_file": test_info["cache_file"],
            "skipped_undecodable": train_info["skipped"] + test_info["skipped"],
        }
    return out


def _report(kind: str, setup: Setup, args, protocol: str, data: dict, hyper: dict, metrics: dict, **extra) -> dict:
    import timm
    import torch

    return {
        "kind": kind,
        "protocol": protocol,
        "encoder": setup.identity,
        "data": data,
        "hyperparameters": hyper,
        "metrics": metrics,
        **extra,
        "wall_time_s": round(time.perf_counter() - setup.started, 2),
        "world_size": _world_size(),
        "command": " ".join(sys.argv),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def _world_size() -> int:
    from accelerate.state import PartialState

    return PartialState().num_processes


def json_out_path(kind: str, identity: dict[str, Any], json_out: str | None) -> Path:
    """``--json-out``, else ``<run>/eval/<kind>.json`` for an encoder in a run folder, else ``./eval_<kind>.json``."""
    if json_out:
        return Path(json_out)
    if identity.get("run_dir"):
        return Path(identity["run_dir"]) / "eval" / f"{kind}.json"
    return Path(f"eval_{kind}.json")


def _write(report: dict[str, Any], args, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> Path:
    """Write the JSON report and print the table (main process only)."""
    out = json_out_path(report["kind"], report["encoder"], args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    enc, data = report["encoder"], report["data"]
    print(f"{KINDS[report['kind']]} ({report['protocol']}) of {enc['path']} [sha256 {enc['sha256']}]")
    print(
        f"data: {data['train_size']} train / {data['test_size']} test images, {data['num_classes']} classes, "
        f"{data['img_size']} px ({data['path']})"
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    print(f"wall time {report['wall_time_s']:.1f} s; JSON: {out}")
    return out


def _accelerator(precision: str):
    from sslvit.accel import make_accelerator

    return make_accelerator(mixed_precision=precision)


def run_knn(argv: list[str] | None = None) -> int:
    """``eval/knn.py``: weighted k-NN (DINO protocol) on cached CLS features."""
    from sslvit.errors import UserError
    from sslvit.evaluation.features import balanced_subset
    from sslvit.evaluation.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, HEADLINE_K, knn_classify

    p = _parser("knn", "Weighted k-NN classification of a frozen encoder (DINO protocol).")
    ks = " ".join(map(str, DEFAULT_KS))
    p.add_argument("--k", type=int, nargs="+", help=f"numbers of neighbours (default: {ks}, clamped to the train set)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="vote weight exp(sim / T)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    accelerator = _accelerator(args.precision)
    setup = _setup(args, started)
    args.k = _check_k(args.k, len(balanced_subset(setup.train.labels, args.limit_train)))
    train, test, data = _features(setup, args, accelerator)
    if max(args.k) > len(train) or min(args.k) < 1:
        raise UserError(
            f"--k {' '.join(map(str, args.k))}: each k must be between 1 and the {len(train)} training images"
        )
    if not accelerator.is_main_process:
        return 0
    per_k = knn_classify(train.cls, train.labels, test.cls, test.labels, args.k, args.temperature, data["num_classes"])
    headline = HEADLINE_K if HEADLINE_K in per_k else min(per_k)
    hyper = {
        "k": sorted(per_k),
        "temperature": args.temperature,
        "feature": "cls (after the final norm)",
        "normalize": "l2",
        "similarity": "cosine (faiss IndexFlatIP)",
        "vote": "sum of exp(sim / T) per class",
        "headline_k": headline,
        "batch_size": args.batch_size,
        "precision": args.precision,
    }
    metrics = {**per_k[headline], "per_k": {str(k): v for k, v in per_k.items()}}
    report = _report("knn", setup, args, "dino-knn", data, hyper, metrics)
    _write(report, args, [(k, f"{v['top1']:.2f}", f"{v['top5']:.2f}") for k, v in per_k.items()], ("k", "top1", "top5"))
    return 0


def _check_k(ks: list[int] | None, n_train: int) -> list[int]:
    """The k values to use for ``n_train`` training images, decided before any feature is extracted.

    The default ks larger than the training set are clamped to it (with a warning); a k the user gave that is
    larger is an error.

    Raises:
        UserError: a given k exceeds the training set.
    """
    import logging

    from sslvit.errors import UserError
    from sslvit.evaluation.knn import DEFAULT_KS

    if ks is not None:
        if max(ks) > n_train:
            raise UserError(f"--k {' '.join(map(str, ks))}: each k must be between 1 and the {n_train} training images")
        return ks
    clamped = sorted({min(k, n_train) for k in DEFAULT_KS})
    if clamped != list(DEFAULT_KS):
        logging.getLogger("sslvit.evaluation").warning(
            "only %d training images: the default --k %s becomes %s", n_train,
            " ".join(map(str, DEFAULT_KS)), " ".join(map(str, clamped)),
        )  # fmt: skip
    return clamped


def run_linear_probe(argv: list[str] | None = None) -> int:
    """``eval/linear_probe.py``: MAE or DINO linear probe, a grid of learning rates picked on held-out data."""
    from sslvit.evaluation.linear import LinearConfig
    from sslvit.recipe import apply_overrides

    p = _parser("linear_probe", "Linear probe of a frozen encoder (MAE or DINO protocol).")
    p.add_argument("--protocol", choices=["mae", "dino"], default="mae")
    p.add_argument("--epochs", type=int, help="default: the protocol's (MAE 90, DINO 100)")
    p.add_argument("--augment", action="store_true", help="paper-exact random crops through the frozen encoder")
    _add_set(p, "LinearConfig fields, e.g. lr_grid=0.1,1,10 n_last_blocks=1 avgpool_patch_tokens=true")
    args = p.parse_args(argv)
    started = time.perf_counter()
    cfg = apply_overrides(
        LinearConfig(protocol=args.protocol, epochs=args.epochs, augment=args.augment), args.overrides
    )
    cfg.validate()
    accelerator = _accelerator(args.precision)
    setup = _setup(args, started)
    train, test, data = _features(setup, args, accelerator)
    result = _linear(setup, args, cfg, train, test, data, accelerator)
    if not accelerator.is_main_process:
        return 0
    protocol = f"{cfg.protocol}-linear" + "-augment" * cfg.augment
    hyper, metrics = result["hyperparameters"], result["metrics"]
    report = _report("linear_probe", setup, args, protocol, data, hyper, metrics, selection=result["selection"])
    rows = [_grid_row(g, result["selection"]["chosen_base_lr"]) for g in result["selection"]["grid"]]
    _write(report, args, rows, ("base_lr", "lr", "val_top1", "test_top1", ""))
    print(f"test top1 {result['metrics']['top1']:.2f}  top5 {result['metrics']['top5']:.2f} (lr picked on val)")
    return 0


def _grid_row(g: dict[str, Any], chosen: float) -> tuple[Any, ...]:
    """One line of the learning-rate grid: base lr, lr, val and test top-1, and a mark on the chosen one."""
    mark = "<- chosen" if g["base_lr"] == chosen else ""
    return g["base_lr"], f"{g['lr']:.4g}", f"{g['val_top1']:.2f}", f"{g['test_top1']:.2f}", mark


def _linear(setup: Setup, args, cfg, train, test, data, accelerator) -> dict[str, Any]:
    from torch.utils.data import Subset

    from sslvit.data import TransformedImages, make_loader
    from sslvit.evaluation.linear import augment_transform, linear_probe

    if not cfg.augment:
        if not accelerator.is_main_process:
            return {}
        return linear_probe(train, test, data["num_classes"], cfg, device=accelerator.device)

    def loader_for(indices):
        images = TransformedImages(setup.train, augment_transform(setup.identity["img_size"]))
        subset = Subset(images, indices.tolist())
        return make_loader(subset, args.batch_size, shuffle=True, drop_last=True, cfg=setup.data_cfg, seed=cfg.seed)

    augmented = {"encoder": setup.encoder, "loader_for": loader_for, "accelerator": accelerator}
    return linear_probe(train, test, data["num_classes"], cfg, augmented, device=accelerator.device)


def run_finetune(argv: list[str] | None = None) -> int:
    """``eval/finetune.py``: full fine-tuning with a named recipe (default: MAE's protocol); resumes when run again."""
    from sslvit.evaluation.features import balanced_subset
    from sslvit.recipe import apply_overrides
    from sslvit.training.finetune import DEFAULT_RECIPE, finetune, list_finetune_recipes, load_finetune_recipe

    if _wants_recipe_list(argv):
        for name, summary in list_finetune_recipes().items():
            print(f"{name:28s} {summary}")
        return 0
    p = _parser("finetune", "Fine-tune an encoder into a classifier with a recipe; run it again to resume.")
    p.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"a fine-tuning recipe name or .py file (default: "
        f"{DEFAULT_RECIPE}; finetune_deit_small_data for a few thousand images)",
    )
    p.add_argument("--list-recipes", action="store_true", help="list the fine-tuning recipes and exit")
    p.set_defaults(batch_size=None)  # the recipe's batch_size_per_device unless --batch-size is given
    _add_set(p, "FinetuneConfig fields, e.g. epochs=50 layer_decay=0.75 base_lr=1e-3 accum_steps=2")
    p.add_argument(
        "--output-dir",
        help="checkpoints and the model (default: <run>/finetune for the default "
        "recipe, <run>/<recipe> for another, or ./<recipe>-<sha> outside a run)",
    )
    args = p.parse_args(argv)
    started = time.perf_counter()
    recipe, cfg = load_finetune_recipe(args.recipe)
    if args.batch_size:
        cfg.batch_size_per_device = args.batch_size
    cfg = apply_overrides(cfg, args.overrides)
    cfg.validate()
    setup = _setup(args, started)
    run_dir = setup.identity.get("run_dir")
    folder = "finetune" if recipe == DEFAULT_RECIPE else recipe  # one folder per recipe: never resume another's
    default_dir = Path(run_dir) / folder if run_dir else Path(f"{folder}-{setup.identity['sha256']}")
    out_dir = Path(args.output_dir) if args.output_dir else default_dir
    train_idx = balanced_subset(setup.train.labels, args.limit_train)
    test_idx = balanced_subset(setup.test.labels, args.limit_test)
    result = finetune(
        setup.encoder,
        setup.identity,
        setup.train,
        setup.test,
        cfg,
        out_dir=out_dir,
        data_cfg=setup.data_cfg,
        train_indices=train_idx,
        test_indices=test_idx,
        crop_pct=setup.crop_pct,
    )
    if not _is_main_process():
        return 0
    extra = {k: result[k] for k in ("history", "model_dir", "resumed_from_epoch")}
    data = _data_report(setup, args, len(train_idx), len(test_idx))
    hyper = {"recipe": recipe, **result["hyperparameters"]}
    report = _report("finetune", setup, args, recipe, data, hyper, result["metrics"], **extra)
    rows = [(h["epoch"], f"{h['loss']:.4f}", f"{h['top1']:.2f}", f"{h['top5']:.2f}") for h in result["history"]]
    _write(report, args, rows, ("epoch", "loss", "top1", "top5"))
    m = result["metrics"]
    print(
        f"last top1 {m['top1']:.2f}, best top1 {m['best_top1']:.2f} (epoch {m['best_epoch']}); "
        f"model: timm.create_model('local-dir:{result['model_dir']}', pretrained=True)"
    )
    return 0


def _is_main_process() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process
