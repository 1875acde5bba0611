"""``make demo``: pretrain MAE and DINO on the built-in digits data, evaluate them, and say what happened.

Runs the ``quickstart`` (MAE) and ``quickstart_dino`` recipes into ``runs/``, then a k-NN and a linear probe
of each exported encoder and of a randomly initialised encoder of the same shape, and prints one table.
A few minutes on 2 CPU cores. Running it again resumes the finished runs instead of training again and
reuses the cached features (delete ``runs/`` to start over).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from pathlib import Path

from sslvit.evaluation.cli import run_knn, run_linear_probe
from sslvit.recipe import apply_overrides, load_recipe
from sslvit.train import pretrain

DEMO_RECIPES = ("quickstart", "quickstart_dino")
# DINO learns slowly (docs/quality.md): a fixed share of the demo's 5 minutes on any machine (439 steps here)
DEMO_OVERRIDES = {"quickstart_dino": ["train.max_steps=0", "train.budget_minutes=1.5"]}
EXTRA = {"knn": [], "linear_probe": ["--epochs", "30"]}  # fewer probe epochs than the protocol: a demo, not a benchmark


def _evaluate(encoder: list[str], out: Path) -> dict[str, float]:
    """k-NN (k=20) and MAE-protocol linear probe top-1 on digits; their JSON goes to ``out``."""
    results = {}
    for kind, run in (("knn", run_knn), ("linear_probe", run_linear_probe)):
        json_out = out / f"{kind}.json"
        with contextlib.redirect_stdout(io.StringIO()):  # each prints its own table; the demo prints one
            run([*encoder, "--data", "digits", "--json-out", str(json_out), "--num-workers", "0", *EXTRA[kind]])
        results[kind] = json.loads(json_out.read_text())["metrics"]["top1"]
    return results


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    rows = []
    for name in DEMO_RECIPES:
        recipe = apply_overrides(load_recipe(name), DEMO_OVERRIDES.get(name, []))
        recipe.validate()
        start = time.perf_counter()
        summary = pretrain(recipe, Path("runs") / name)
        wall = time.perf_counter() - start
        m = recipe.model
        shape = [f"img_size={m.img_size}", f"patch_size={m.patch_size}", f"depth={m.depth}",
                 f"embed_dim={m.embed_dim}", f"num_heads={m.num_heads}"]  # fmt: skip
        random = ["--encoder", m.name, "--weights", "random", "--model-args", *shape]
        scores = _evaluate(["--encoder", summary["encoder"]], Path(summary["run_dir"]) / "eval")
        baseline = _evaluate(random, Path(summary["run_dir"]) / "eval" / "random_init")
        rows.append((name, recipe.objective.name, summary, wall, scores, baseline))
    print("\nsslvit demo: pretraining on digits (1437 train / 360 test images, 32 px), then evaluation")
    print(f"{'recipe':<16}{'objective':<10}{'steps':>6}{'images/s':>10}{'final loss':>12}{'train s':>9}"
          f"{'k-NN top1 (random -> pretrained)':>36}{'linear top1 (random -> pretrained)':>38}")  # fmt: skip
    for name, objective, s, wall, scores, base in rows:
        speed = f"{s['images_per_s']:.0f}" if s["images_per_s"] else "resumed"
        loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"
        knn = f"{base['knn']:.1f}% -> {scores['knn']:.1f}%"
        linear = f"{base['linear_probe']:.1f}% -> {scores['linear_probe']:.1f}%"
        print(f"{name:<16}{objective:<10}{s['steps']:>6}{speed:>10}{loss:>12}{wall:>9.1f}{knn:>36}{linear:>38}")
    for name, _, s, *_ in rows:
        print(f"\n{name}: run folder {s['run_dir']}, evaluation JSON in {s['run_dir']}/eval/")
        print(f"  encoder export: timm.create_model('local-dir:{s['encoder']}', pretrained=True)")
    print("\nwatch the runs: tensorboard --logdir runs")


if __name__ == "__main__":
    main()
