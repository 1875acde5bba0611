"""The evaluation commands' options: the shared argument parser, and the checks that refuse impossible values
before any work (each one ``error:`` line naming the option). Standard library only at import, like ``cli.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """``--encoder``, ``--weights`` and ``--model-args``: what every command that loads an encoder takes."""
    p.add_argument(
        "--encoder",
        required=True,
        help="run folder, encoder/ export, checkpoint folder, timm model "
        "name (with --weights) or a .pth/.safetensors file (official MAE/DINO formats included)",
    )
    p.add_argument("--weights", help="with a timm model name: a .safetensors/.pth file, or 'random' (seeded init)")
    p.add_argument(
        "--model-args",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="timm create_model arguments for a timm model name, e.g. img_size=32 patch_size=4",
    )


def _parser(kind: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"eval/{kind}.py", description=description)
    p.set_defaults(kind=kind)
    add_encoder_arguments(p)
    p.add_argument("--data", required=True, help="digits, an image folder, parquet/arrow files or a Hub dataset id")
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", help="default: the first of test, val, validation that exists")
    p.add_argument("--label-column", default="", help="table sources: the label column (default: inferred)")
    p.add_argument("--image-column", default="", help="table sources: the image column (default: inferred)")
    p.add_argument("--limit-train", type=int, help="a class-balanced subset of this many training images")
    p.add_argument("--limit-test", type=int, help="a class-balanced subset of this many test images")
    p.add_argument("--img-size", type=int, help="evaluation resolution (default: the encoder's; pos-embed resampled)")
    crop = "Resize to img_size / crop_pct, CenterCrop img_size (default: 1.0 up to 64 px, else 0.875)"
    p.add_argument("--crop-pct", type=float, help=crop)
    p.add_argument("--batch-size", type=int, default=256, help="images per device")
    p.add_argument("--num-workers", type=int, default=-1, help="data loader workers (-1: min(8, cores))")
    p.add_argument("--json-out", help="where to write the JSON report")
    p.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="data without separate splits (a plain class folder): hold out this fraction of --train-split per "
        "class as the test set, e.g. 0.2 (seeded by --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="the --holdout split's seed")
    if kind != "finetune":
        p.add_argument("--cache-dir", help="feature cache (default: $SSLVIT_CACHE/features or ~/.cache/sslvit)")
        p.add_argument("--no-cache", action="store_true", help="extract features without reading or writing a cache")
        p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no", help="autocast for extraction")
    return p


def _parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["img_size=32", "qkv_bias=false"]`` -> ``{"img_size": 32, "qkv_bias": False}`` (JSON values, else strings)."""
    from sslvit.errors import UserError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--model-args {item!r} must look like key=value, e.g. patch_size=4")
        try:
            out[key] = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except ValueError:
            out[key] = raw
    return out


def check_options(args: argparse.Namespace) -> None:
    """Refuse impossible option values before any work (each is one error line naming the option).

    Raises:
        UserError: a size, limit or count is not positive, a number is not finite, or ``--json-out`` is a folder.
    """
    import math

    from sslvit.errors import UserError

    positive = {"--limit-train": args.limit_train, "--limit-test": args.limit_test, "--img-size": args.img_size,
                "--batch-size": args.batch_size, "--epochs": getattr(args, "epochs", None)}  # fmt: skip
    for option, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"{option} {value} must be a positive integer")
    if args.num_workers < -1:
        raise UserError(f"--num-workers {args.num_workers} must be -1 (auto) or >= 0")
    if args.crop_pct is not None and not (math.isfinite(args.crop_pct) and 0 < args.crop_pct <= 1):
        raise UserError(f"--crop-pct {args.crop_pct} must be in (0, 1]: the fraction of the resized image kept")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature {temperature} must be a positive number (DINO's is 0.07)")
    if getattr(args, "k", None) is not None and min(args.k) < 1:
        raise UserError(f"--k {' '.join(map(str, args.k))}: each k must be >= 1")
    if args.holdout is not None and not (math.isfinite(args.holdout) and 0 < args.holdout < 1):
        raise UserError(f"--holdout {args.holdout} must be a fraction strictly between 0 and 1, e.g. 0.2")
    if args.holdout is not None and args.test_split:
        raise UserError("--holdout makes the test set from --train-split: drop --test-split")
    if not 0 <= args.seed <= 2**32 - 1:
        raise UserError(f"--seed {args.seed} must be between 0 and 2**32 - 1")
    if args.json_out:
        check_json_out(Path(args.json_out))


def check_json_out(path: Path) -> None:
    """``--json-out`` (or its default) must be a file that can be written: checked before the work, not after it.

    Raises:
        UserError: it is a folder, or a folder above it is a file.
    """
    from sslvit.errors import UserError

    if path.is_dir():
        raise UserError(f"--json-out {path} is a folder; name a file, e.g. {path / 'report.json'}")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"--json-out {path}: {above} is a file, not a folder")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"--json-out {path}: {above} is not writable")


def _wants_recipe_list(argv: list[str] | None) -> bool:
    """``--list-recipes`` given: answered before the parser, which would first ask for --encoder and --data."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--list-recipes", action="store_true")
    return pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].list_recipes


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help
    )
