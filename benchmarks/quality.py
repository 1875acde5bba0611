"""Quality per compute: pretrain a recipe under a budget, then measure what the encoder learned.

One run = one JSON object on stdout (and appended to ``--json-out`` when given):

1. pretrain ``--recipe`` on ``--data`` (``cifar10`` = ../shared/data/cifar10, ``digits``, or any ``data.path``) for
   ``--minutes M`` (``train.budget_minutes``: the whole schedule fits in M minutes, this process's startup
   included) or ``--steps N`` (``train.max_steps``), in this process, with the recipe's own precision and loader;
2. evaluate the exported encoder and, as the baseline, the same architecture at its seeded random init:
   DINO's weighted k-NN (k=20, T=0.07) on the CLS token and on the mean-pooled patch tokens (full train split as
   the bank, full test split as queries, unless ``--limit-train``/``--limit-test``), and the MAE linear-probe
   protocol (LARS, BatchNorm without affine, 90 epochs, the lr grid picked on a held-out 10%) on cached CLS
   features.

The JSON has the recipe and its overrides, the budget, steps, images seen, wall time split into startup / training
/ export / evaluation, the chosen rate, the k-NN and linear top-1 of both encoders, the machine (CPU model,
cores, torch threads) and its load average before and after, so a figure taken on a busy machine shows it.

    python benchmarks/quality.py --recipe dino_vit_tiny_cifar --data cifar10 --minutes 15
    python benchmarks/quality.py --recipe quickstart_dino --data digits --steps 300 --set optim.base_lr=1e-3
    make bench-quality   # the table in BENCHMARKS.md (about 35 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

START = time.time()  # before the heavy imports: a time budget counts them

import psutil  # noqa: E402  (an accelerate dependency)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslvit.accel import make_accelerator  # noqa: E402
from sslvit.evaluation.features import cached_features, default_crop_pct, open_labelled  # noqa: E402
from sslvit.evaluation.knn import knn_classify  # noqa: E402
from sslvit.evaluation.linear import LinearConfig, linear_probe  # noqa: E402
from sslvit.evaluation.load import load_encoder  # noqa: E402
from sslvit.recipe import DataConfig, apply_overrides, load_recipe  # noqa: E402
from sslvit.train import build_objective, pretrain  # noqa: E402

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
K, TEMPERATURE = 20, 0.07


def data_path(name: str) -> str:
    """``cifar10`` is the shared copy beside the project; anything else is a ``data.path`` as it is."""
    if name == "cifar10":
        if not SHARED_CIFAR10.is_dir():
            raise SystemExit(f"error: {SHARED_CIFAR10} is not there; pass --data PATH to a CIFAR-10 copy")
        return str(SHARED_CIFAR10)
    return name


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": model,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
    }


def evaluate(
    encoder_spec: str,
    weights: str | None,
    model_args: dict[str, Any] | None,
    data: str,
    limits: tuple[int | None, int | None],
    precision: str = "no",
) -> dict[str, Any]:
    """k-NN on CLS and mean-pooled patch tokens, and the MAE linear probe, of one encoder on ``data``.

    Features are extracted at the recipe's ``precision`` (bf16 for the CIFAR recipes: 3-4x faster on a CPU with
    AMX; the training run already fixed the process's Accelerate precision).
    """
    encoder, identity = load_encoder(encoder_spec, weights, None, model_args)
    cfg = DataConfig(path=data, num_workers=-1)
    train_source, test_source, test_split = open_labelled(cfg, "train", None)
    common = {
        "crop_pct": default_crop_pct(identity["img_size"]),
        "batch_size": 256,
        "cfg": cfg,
        "accelerator": make_accelerator(mixed_precision=precision),
        "cache_dir": Path("runs") / "quality" / ".features",
    }
    train, _ = cached_features(encoder, identity, train_source, "train", limit=limits[0], **common)
    test, _ = cached_features(encoder, identity, test_source, test_split, limit=limits[1], **common)
    num_classes = len(train_source.class_names)
    out = {}
    for feature in ("cls", "patch_mean"):
        per_k = knn_classify(
            getattr(train, feature), train.labels, getattr(test, feature), test.labels, [K], TEMPERATURE, num_classes
        )
        out[f"knn_{feature}_top1"] = round(per_k[K]["top1"], 2)
    probe = linear_probe(train, test, num_classes, LinearConfig(protocol="mae"))
    out["linear_top1"] = round(probe["metrics"]["top1"], 2)
    out.update(num_train=len(train), num_test=len(test), sha256=identity["sha256"])
    return out


def random_args(recipe) -> tuple[str, dict[str, Any]]:
    """The recipe's backbone as a timm name and ``create_model`` arguments (for the seeded random baseline)."""
    from sslvit.backbone import model_args

    objective, _ = build_objective(recipe)
    return recipe.model.name, model_args(recipe.model, **type(objective).backbone_kwargs(recipe.objective))


def table(jsonl: Path) -> str:
    """A markdown table of the JSON lines in ``jsonl`` (``--table``): one row per run, in file order."""
    head = (
        "| label | objective | budget | steps | images seen | train s | k-NN CLS | k-NN patch mean | linear |"
        " random k-NN CLS / patch / linear |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for line in Path(jsonl).read_text().splitlines():
        r = json.loads(line)
        p, b = r["pretrained"], r["random"] or {}
        budget = f"{r['budget']['minutes']:g} min" if "minutes" in r["budget"] else f"{r['budget']['steps']} steps"
        base = " / ".join(str(b.get(k, "-")) for k in ("knn_cls_top1", "knn_patch_mean_top1", "linear_top1"))
        rows.append(
            f"| {r['label']} | {r['objective']} | {budget} | {r['steps']} | {r['images_seen']} | "
            f"{r['wall_s']['training']:.0f} | {p['knn_cls_top1']:.1f} | {p['knn_patch_mean_top1']:.1f} | "
            f"{p['linear_top1']:.1f} | {base} |"
        )
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--data", default="cifar10", help="cifar10 (the shared copy), digits, or a data.path")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="train.budget_minutes (startup included)")
    budget.add_argument("--steps", type=int, help="train.max_steps")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--output-dir", help="run folder (default: runs/quality/<recipe>-<budget>; replaced)")
    p.add_argument("--label", default="", help="a name for this row (ablation tables)")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    p.add_argument("--limit-train", type=int, help="class-balanced k-NN bank / probe train subset (default: all)")
    p.add_argument("--limit-test", type=int, help="class-balanced test subset (default: all)")
    p.add_argument("--json-out", help="also append the JSON line to this file")
    if argv is None and "--table" in sys.argv:  # python benchmarks/quality.py --table runs/quality/quality.jsonl
        print(table(Path(sys.argv[sys.argv.index("--table") + 1])))
        return {}
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)

    data = data_path(args.data)
    length = f"train.budget_minutes={args.minutes}" if args.minutes else f"train.max_steps={args.steps}"
    recipe = apply_overrides(load_recipe(args.recipe), [f"data.path={data}", length, *args.overrides])
    recipe.validate()
    tag = f"{args.minutes:g}min" if args.minutes else f"{args.steps}steps"
    run_dir = Path(args.output_dir or Path("runs") / "quality" / f"{recipe.name}-{tag}")
    if run_dir.exists():  # every row is a fresh run: no resume from an earlier measurement
        import shutil

        shutil.rmtree(run_dir)
    load_before = os.getloadavg()[0]
    summary = pretrain(recipe, run_dir, started=psutil.Process().create_time() if args.minutes else None)
    began_eval = time.time()
    limits = (args.limit_train, args.limit_test)
    precision = recipe.train.precision
    pretrained = evaluate(str(run_dir / "encoder"), None, None, data, limits, precision)
    eval_s = time.time() - began_eval
    random = None
    if not args.no_random:
        name, model_args = random_args(recipe)
        random = evaluate(name, "random", model_args, data, limits, precision)
    timing = summary["timing"]
    batch = recipe.train.global_batch_size or recipe.train.batch_size_per_device  # 0 = no accumulation, 1 process
    result = {
        "benchmark": "quality",
        "label": args.label or recipe.name,
        "recipe": recipe.name,
        "objective": recipe.objective.name,
        "overrides": args.overrides,
        "data": args.data,
        "budget": {"minutes": args.minutes} if args.minutes else {"steps": args.steps},
        "steps": summary["steps"],
        "global_batch": batch,
        "images_seen": summary["steps"] * batch,
        "seconds_per_step": summary.get("budget", {}).get("seconds_per_step"),
        "images_per_s": summary["images_per_s"] and round(summary["images_per_s"], 1),
        "final_loss": summary["final_loss"],
        "wall_s": {
            "startup": round(timing["startup_s"], 1),
            "training": round(timing["train_s"], 1),
            "export": round(timing["export_s"], 1),
            "pretrain_total": round(timing["total_s"], 1),
            "evaluation": round(eval_s, 1),
        },
        "eval_precision": precision,
        "pretrained": pretrained,
        "random": random,
        "machine": {
            **machine(),
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        },
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
