"""What a recipe works out to at one launch: global batch, accumulation, absolute lr and step counts.

Computed from the recipe and the number of processes (and the images per epoch, or the total a time budget
chose), logged at start and stored beside the recipe in the run's config, never written back into it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from sslvit.recipe import Recipe
from sslvit.training.schedules import plan_batch


@dataclass(frozen=True)
class Derived:
    """Values computed from the recipe and the launch; logged at start, never written into the recipe."""

    world_size: int
    batch_size_per_device: int
    grad_accum_steps: int
    global_batch_size: int
    lr: float
    num_samples: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int | None
    epochs: int


def derive(recipe: Recipe, world_size: int, num_samples: int | None, budget_steps: int | None = None) -> Derived:
    """Compute global batch, accumulation, absolute lr and step counts.

    Args:
        recipe: the resolved recipe.
        world_size: number of training processes.
        num_samples: images per epoch, or None when unknown (streaming data, or not yet counted).
        budget_steps: with ``train.budget_minutes``, the total the loop chose at start (None: not yet decided,
            and ``total_steps`` / ``warmup_steps`` are None).

    Raises:
        RecipeError: the global batch cannot be split evenly over the processes.
    """
    train = recipe.train
    batch = plan_batch(
        train.batch_size_per_device, world_size, recipe.optim.base_lr, global_batch=train.global_batch_size
    )
    global_batch = batch.global_batch
    steps_per_epoch = None if num_samples is None else num_samples // global_batch
    if recipe.train.budget_minutes:
        total = budget_steps
    else:
        total = recipe.train.max_steps or (steps_per_epoch * recipe.schedule.epochs if steps_per_epoch else None)
    # With train.max_steps (or a budget) the whole schedule (warmup included) is compressed into that many steps.
    warmup = None if total is None else round(total * recipe.schedule.warmup_epochs / recipe.schedule.epochs)
    return Derived(
        world_size=world_size,
        batch_size_per_device=batch.batch_size_per_device,
        grad_accum_steps=batch.accum_steps,
        global_batch_size=global_batch,
        lr=batch.lr,
        num_samples=num_samples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup,
        epochs=recipe.schedule.epochs,
    )


def resolved_json(recipe: Recipe, derived: Derived | None = None) -> str:
    """The resolved recipe (and derived values, when given) as indented JSON."""
    tree = recipe.to_dict()
    if derived is not None:
        tree["derived"] = dataclasses.asdict(derived)
        if recipe.train.budget_minutes and derived.total_steps is None:
            for key in ("total_steps", "warmup_steps"):
                tree["derived"][key] = "decided at start: as many steps as fit in train.budget_minutes"
    return json.dumps(tree, indent=2)
