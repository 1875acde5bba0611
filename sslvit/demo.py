"""``make demo``: pretrain on the built-in digits data and say what happened, in a few minutes on a CPU.

Runs the ``quickstart`` recipe (MAE, tiny ViT) into ``runs/quickstart``. Running it again resumes the finished
run instead of training again (delete ``runs/`` to start over).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sslvit.recipe import load_recipe
from sslvit.train import pretrain

DEMO_RECIPES = ("quickstart",)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    rows = []
    for name in DEMO_RECIPES:
        recipe = load_recipe(name)
        start = time.perf_counter()
        summary = pretrain(recipe, Path("runs") / name)
        rows.append((name, recipe.objective.name, summary, time.perf_counter() - start))
    print("\nsslvit demo: pretraining on digits (1437 images, 32 px)")
    print(f"{'recipe':<12} {'objective':<9} {'steps':>6} {'images/s':>9} {'final loss':>11} {'wall s':>7}  run folder")
    for name, objective, s, wall in rows:
        speed = f"{s['images_per_s']:.0f}" if s["images_per_s"] else "resumed"
        loss = f"{s['final_loss']:.4f}" if s["final_loss"] is not None else "-"
        print(f"{name:<12} {objective:<9} {s['steps']:>6} {speed:>9} {loss:>11} {wall:>7.1f}  {s['run_dir']}")
    for _, _, s, _ in rows:
        print(f"\nencoder export: {s['encoder']}")
        print(f"  load it: timm.create_model('local-dir:{s['encoder']}', pretrained=True)")
    print("watch the runs: tensorboard --logdir runs")


if __name__ == "__main__":
    main()
