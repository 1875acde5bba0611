"""What a pretraining run shows while it trains: a fixed batch of images, their visualisations, the online k-NN.

The pretraining loop (:mod:`sslvit.training.pretrain`) calls them; none of them changes the training.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from accelerate import Accelerator

from sslvit import data
from sslvit.data.augment import render_on_device
from sslvit.objectives import Objective
from sslvit.recipe import Recipe

log = logging.getLogger("sslvit")

Monitor = Callable[..., dict[str, float]]  # the online k-NN: (encoder, step, log_it=True) -> values to log


def fixed_batch(dataset: Any, n: int, device: torch.device, streaming: bool) -> dict[str, Any] | None:
    """The same few images for every visualisation, so TensorBoard shows progress on fixed inputs."""
    items = list(itertools.islice(dataset, n)) if streaming else [dataset[i] for i in range(min(n, len(dataset)))]
    batch = data.collate_skipping(items)
    if batch["views"] is None:
        return None
    views = batch["views"]
    batch["views"] = [v.to(device) for v in views] if isinstance(views, list) else views.to(device)
    return render_on_device(dataset, batch)


def knn_monitor(recipe: Recipe, accelerator: Accelerator) -> Monitor | None:
    """The online k-NN monitor (``eval.knn_every``), its data opened now so a mistake fails before training."""
    if not recipe.eval.knn_every:
        return None
    from sslvit.evaluation.features import open_labelled
    from sslvit.evaluation.knn import knn_eval

    cfg = replace(recipe.data, path=recipe.eval.data or recipe.data.path, streaming=False, num_workers=0)
    train, test, _ = open_labelled(cfg, recipe.eval.train_split, recipe.eval.test_split or None)
    limits = {"limit_train": recipe.eval.limit_train, "limit_test": recipe.eval.limit_test}

    def run(encoder: torch.nn.Module, step: int, log_it: bool = True) -> dict[str, float]:
        result = knn_eval(encoder, train, test, ks=(recipe.eval.k,), accelerator=accelerator, data_cfg=cfg, **limits)
        if not log_it:  # timed by the budget probe
            return {}
        accelerator.log({"knn/top1": result["top1"], "knn/top5": result["top5"]}, step=step)
        if accelerator.is_main_process:
            log.info("step %d: k-NN (k=%d) top1 %.2f%%, top5 %.2f%%", step, result["k"], result["top1"], result["top5"])
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}

    return run


def log_images(accelerator: Accelerator, objective: Objective, batch: dict[str, Any], step: int) -> None:
    """Log the objective's visualisations of the fixed batch (main process only, eval mode, no grad)."""
    if not accelerator.is_main_process:
        return
    objective.eval()
    with torch.no_grad(), accelerator.autocast():
        images = objective.visualize(batch)
    objective.train()
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for tag, image in images.items():
        writer.add_image(tag, image.float().clamp(0, 1).cpu(), step)
