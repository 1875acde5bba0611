"""Command-line entry points: ``python pretrain.py ...`` and the ``sslvit`` console script.

Every user mistake (a :class:`~sslvit.errors.UserError`) ends as one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sslvit.errors import DataError, UserError
from sslvit.evaluation.cli import run_finetune, run_knn, run_linear_probe  # standard library only at import


def pretrain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Pretrain a ViT encoder with a self-supervised recipe (run it again to resume).",
    )
    parser.add_argument("--recipe", help="a recipe name (see --list-recipes) or a path to a recipe .py file")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override recipe fields by dotted path, e.g. --set optim.base_lr=1e-4 data.path=/data/train",
    )
    parser.add_argument("--output-dir", help="run folder (default: runs/<recipe>)")
    parser.add_argument("--list-recipes", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    return parser


def resolve(recipe_name: str, overrides: list[str]):
    """Load, override and validate a recipe (imported lazily: --help stays fast)."""
    from sslvit.recipe import apply_overrides, load_recipe

    recipe = apply_overrides(load_recipe(recipe_name), overrides)
    recipe.validate()
    return recipe


def run_pretrain(argv: list[str] | None = None) -> int:
    args = pretrain_parser().parse_args(argv)
    from sslvit.accel import launched_world_size
    from sslvit.recipe import list_recipes
    from sslvit.training.derived import derive, resolved_json

    if args.list_recipes:
        for name in list_recipes():
            print(name)
        return 0
    if not args.recipe:
        raise UserError("--recipe is required (see --list-recipes), e.g. --recipe quickstart")
    recipe = resolve(args.recipe, args.overrides)
    if args.print_config:
        print(resolved_json(recipe, derive(recipe, launched_world_size(), _count(recipe))))
        return 0
    if not recipe.data.path:
        raise UserError(f"recipe {recipe.name} needs data.path: add --set data.path=/path/to/images")
    from sslvit.train import pretrain

    run_dir = Path(args.output_dir or Path("runs") / recipe.name)
    summary = pretrain(recipe, run_dir, started=_process_start())
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _process_start() -> float:
    """When this process started (``time.time()`` clock): a time budget counts the imports too."""
    import psutil  # an accelerate dependency

    return psutil.Process().create_time()


def _count(recipe) -> int | None:
    """Images per epoch for --print-config, when they can be counted without decoding; else None."""
    from sslvit.data import count_samples

    try:
        return count_samples(recipe.data) if recipe.data.path else None
    except DataError:
        return None
    except Exception as err:  # a damaged file (pyarrow, PIL, ...): --print-config still prints, the count unknown
        logging.getLogger("sslvit").warning("cannot count the images of data.path=%s: %s", recipe.data.path, err)
        return None


def run_export(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslvit export", description="Export a run's encoder (timm, Hub, ONNX).")
    parser.add_argument("run_dir", help="an sslvit run folder (runs/<recipe>)")
    parser.add_argument("--hub-repo", metavar="ORG/NAME", help="push the encoder to this Hugging Face Hub repo")
    parser.add_argument("--hub-dir", metavar="DIR", help="write the exact folder --hub-repo would push, offline")
    parser.add_argument("--onnx", metavar="FILE", help="also export to ONNX and check it with onnxruntime")
    parser.add_argument("--license", metavar="ID", help="the license the Hub card and config state, e.g. cc-by-4.0")
    parser.add_argument("--force", action="store_true", help="--hub-dir may overwrite files sslvit did not write")
    args = parser.parse_args(argv)
    from sslvit import export

    if not (args.hub_repo or args.hub_dir or args.onnx):
        out = export.export_run(Path(args.run_dir))
        print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True)")
    if args.hub_dir:
        out = export.write_hub_folder(Path(args.run_dir), Path(args.hub_dir), args.license, args.force)
        print(f"wrote {out} (what --hub-repo pushes): timm.create_model('local-dir:{out}', pretrained=True)")
    if args.hub_repo:
        print(f"pushed to {export.push_to_hub(Path(args.run_dir), args.hub_repo, args.license)}")
    if args.onnx:
        result = export.export_onnx(Path(args.run_dir), Path(args.onnx))
        print(f"wrote {result['onnx']} ({result['output']}); max |onnxruntime - torch| = {result['max_abs_diff']:.3g}")
    return 0


def run_list(argv: list[str] | None = None) -> int:
    return run_pretrain(["--list-recipes"])


def run_attention_distance(argv: list[str] | None = None) -> int:
    from sslvit.evaluation.attention import run_attention_distance as run  # imports torch: only when asked

    return run(argv)


COMMANDS: dict[str, Callable[[list[str] | None], int]] = {
    "pretrain": run_pretrain,
    "export": run_export,
    "recipes": run_list,
    "knn": run_knn,
    "linear-probe": run_linear_probe,
    "finetune": run_finetune,
    "attention-distance": run_attention_distance,
}


def guarded(command: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``command``; a UserError becomes one line on stderr and exit code 2."""
    _setup_logging()
    try:
        code = command(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        _leave_process_group(wait=False)  # the others may have failed too, or be stopped by the launcher
        return 2
    _leave_process_group(wait=True)
    return code


def _leave_process_group(wait: bool) -> None:
    """Leave the launch's process group, after the other processes have finished when ``wait``.

    A process that exits with gloo's threads still running aborts ("terminate called without an active
    exception", exit signal 6): it happened to a k-NN evaluation's rank 1, which returns while rank 0 classifies.
    """
    import torch.distributed as dist  # here, not at the top: this module imports the standard library only

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _setup_logging() -> None:
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint at INFO


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: sslvit {{{','.join(COMMANDS)}}} ...  (sslvit COMMAND --help for each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return guarded(COMMANDS[argv[0]], argv[1:])


def pretrain_main() -> int:
    return guarded(run_pretrain)
