"""The typed state the training loop carries, resumes from and hands to its callback.

:class:`Trainer` is what the loop is built from (prepared model, optimizer, recipe, derived values),
:class:`TrainState` what changes from step to step and what a checkpoint records besides Accelerate's state,
:class:`StepResult` what one optimisation step returns. :class:`LoopCallback` is the documented way for benchmarks
and tools to observe the loop (instead of replacing its functions).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from sslvit.checkpoint import load_checkpoint, read_trainer_state

if TYPE_CHECKING:
    from sslvit.objectives import Objective
    from sslvit.recipe import Derived, Recipe

log = logging.getLogger("sslvit")


@dataclass
class Trainer:
    """What the pretraining loop runs on: the prepared objective and optimizer, the recipe and its derived values."""

    accelerator: Accelerator
    model: torch.nn.Module  # the objective as ``accelerator.prepare`` returned it (DDP-wrapped on many processes)
    optimizer: torch.optim.Optimizer
    recipe: Recipe
    derived: Derived

    @property
    def objective(self) -> Objective:
        """The objective itself, unwrapped."""
        return self.accelerator.unwrap_model(self.model)


@dataclass
class StepResult:
    """One optimisation step's outcome."""

    epoch: int  # the epoch its micro-batches came from
    outputs: dict[str, torch.Tensor]  # the objective's outputs averaged over the micro-batches (on device)
    grad_norm: torch.Tensor
    finite: bool  # False: loss or gradient norm was NaN/Inf and the weights were left untouched
    scheduled: dict[str, float]  # lr, weight decay and the objective's schedule values, for the log
    skipped: Counter[str]  # samples that failed to decode in these micro-batches, by reason


@dataclass
class TrainState:
    """Where a pretraining run is; the first five fields are stored in every checkpoint's ``trainer_state.json``."""

    step: int = 0  # optimisation steps done
    epoch: int = 0
    last_log: dict[str, float] = field(default_factory=dict)  # the latest logged values (the summary reads them)
    init: Any = None  # what ``model.init`` loaded at the fresh start (sslvit.weights.describe_init)
    budget: dict[str, Any] | None = None  # the ``train.budget_minutes`` plan, kept by a resumed run
    bad_in_a_row: int = 0  # non-finite steps in a row (train.max_bad_steps stops the run)
    skipped: Counter[str] = field(default_factory=Counter)  # undecodable samples so far, by reason

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint's trainer state records."""
        return cls(
            saved["step"], saved.get("epoch", 0), saved.get("last_log", {}), saved.get("init"), saved.get("budget")
        )

    def to_checkpoint(self, recipe_name: str, world_size: int, encoder_info: dict[str, Any]) -> dict[str, Any]:
        """The trainer state to store: this state, the run's recipe and world size, the encoder's identity."""
        saved = {
            "step": self.step,
            "epoch": self.epoch,
            "recipe": recipe_name,
            "world_size": world_size,
            "last_log": self.last_log,
            "init": self.init,
            **encoder_info,
        }
        return {**saved, "budget": self.budget} if self.budget is not None else saved


class LoopCallback:
    """Hooks into the pretraining loop for benchmarks and tools; every method does nothing by default.

    Pass one to :func:`sslvit.training.pretrain.pretrain` (``callback=``). The methods run on every process.
    """

    def on_step_start(self, step: int) -> None:
        """Called before optimisation step ``step`` (0-based) begins (schedules, data, forward, ...)."""

    def on_periodic(self, what: str, seconds: float) -> None:
        """A periodic cost just ran: ``what`` is ``"checkpoint"``, ``"images"`` or ``"knn"``, taking ``seconds``."""


def resume_latest(
    accelerator: Accelerator, checkpoint: Path | None, check: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any] | None:
    """Restore the prepared objects from ``checkpoint`` (the newest complete one, or None for a fresh start).

    Pretraining and fine-tuning resume through this one function. ``check`` sees the trainer state before
    anything is loaded and raises when the checkpoint belongs to another run (e.g. a fine-tune of another encoder).

    Returns:
        The checkpoint's trainer state, or None when there is no checkpoint.
    """
    if checkpoint is None:
        return None
    if check is not None:
        check(read_trainer_state(checkpoint))
    return load_checkpoint(accelerator, checkpoint)  # a damaged checkpoint: one CheckpointError
