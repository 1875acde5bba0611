"""Per-step schedules and the batch / learning-rate rule shared by pretraining, fine-tuning and linear probing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sslvit.errors import RecipeError

if TYPE_CHECKING:
    from sslvit.recipe import OptimConfig
    from sslvit.training.derived import Derived


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The absolute learning rate of ``base_lr`` given per 256 images (Goyal et al. 2017; MAE, DINO, DeiT)."""
    return base_lr * global_batch / 256


@dataclass(frozen=True)
class BatchPlan:
    """How one optimisation step's images are split: ``global_batch = processes x per_device x accum_steps``."""

    batch_size_per_device: int
    accum_steps: int
    global_batch: int
    lr: float


def plan_batch(
    per_device: int, world_size: int, base_lr: float, *, global_batch: int = 0, accum_steps: int = 1
) -> BatchPlan:
    """The step's batch and absolute lr, from a fixed ``global_batch`` (the accumulation follows) or, with
    ``global_batch=0``, from ``accum_steps`` (the global batch follows).

    Raises:
        RecipeError: ``global_batch`` is not a multiple of ``world_size x per_device``.
    """
    if global_batch:
        accum_steps, rest = divmod(global_batch, world_size * per_device)
        if rest or accum_steps == 0:
            raise RecipeError(
                f"train.global_batch_size={global_batch} is not a multiple of {world_size} process(es) x "
                f"train.batch_size_per_device={per_device}; change one of them (or set train.global_batch_size=0 "
                "for no gradient accumulation)"
            )
    else:
        global_batch = world_size * per_device * accum_steps
    return BatchPlan(per_device, accum_steps, global_batch, scaled_lr(base_lr, global_batch))


def warmup_cosine(
    step: int, total: int, warmup: int, base: float, final: float, start: float = 0.0, inclusive: bool = False
) -> float:
    """Linear warmup from ``start`` to ``base`` over ``warmup`` steps, then a half-cycle cosine to ``final``.

    The per-iteration schedules of facebookresearch/mae (util/lr_sched.py: ``base * step / warmup``, the base rate
    at step ``warmup``) and, with ``inclusive``, of facebookresearch/dino (utils.cosine_scheduler: the warmup is
    ``np.linspace(start, base, warmup)``, the base rate at step ``warmup - 1``). Both then run the cosine over
    steps ``warmup .. total - 1`` as ``(step - warmup) / (total - warmup)``. lightly's ``cosine_warmup_schedule``
    starts warmup at ``(step + 1) / warmup`` and ends the cosine one step early, so it is not used here.
    """
    if step < warmup:
        if inclusive:
            return start if warmup == 1 else start + (base - start) * step / (warmup - 1)
        return start + (base - start) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def apply_schedules(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, derived: Derived, step: int, inclusive_warmup: bool = False
) -> dict[str, Any]:
    """Set this step's learning rate and weight decay on every parameter group; return them for logging.

    A group's ``lr_scale`` (set by an objective's :meth:`~sslvit.objectives.Objective.param_groups`) multiplies
    its rate. ``inclusive_warmup``: the objective's warmup convention
    (:attr:`~sslvit.objectives.Objective.warmup_reaches_base_at_last_step`).
    """
    lr = warmup_cosine(
        step,
        derived.total_steps,
        derived.warmup_steps,
        derived.lr,
        optim.min_lr,
        optim.warmup_start_lr,
        inclusive_warmup,
    )
    wd = optim.weight_decay
    if optim.weight_decay_end is not None:
        wd = warmup_cosine(step, derived.total_steps, 0, wd, optim.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group["weight_decay"] > 0:  # groups without decay (biases, norms, tokens) stay at 0
            group["weight_decay"] = wd
    return {"lr": lr, "weight_decay": wd}
