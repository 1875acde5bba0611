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
    from sslvit.recipe import Recipe
    from sslvit.training.derived import Derived

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
    stop: bool = False  # a process was asked to stop (train.stop_signals): every process stops after this step


@dataclass
class SkipCounts:
    """Samples that failed to decode: this epoch's and the run's, over all processes.

    ``here`` counts this process's skips not yet summed over the processes; :meth:`epoch_count` sums them (a
    collective: every process calls it at the same step). A checkpoint stores the sums, so a run resumed in the middle
    of an epoch still reports that whole epoch. ``reasons`` are this process's (the log shows the main process's).
    """

    here: Counter[str] = field(default_factory=Counter)
    epoch_before: int = 0  # this epoch, all processes, summed before a resume
    total_before: int = 0  # the epochs before this one, all processes
    reasons: Counter[str] = field(default_factory=Counter)  # this epoch, this process, by reason

    def add(self, skipped: dict[str, int]) -> None:
        self.here.update(skipped)
        self.reasons.update(skipped)

    def epoch_count(self, accelerator: Accelerator) -> int:
        """This epoch's skips so far over all processes (every process must call it)."""
        here = torch.tensor(sum(self.here.values()), device=accelerator.device)
        return int(accelerator.reduce(here, "sum")) + self.epoch_before

    def end_epoch(self, epoch_count: int) -> None:
        """The epoch that ended had ``epoch_count`` skips: add them to the total, start the next epoch at zero."""
        self.total_before += epoch_count
        self.here, self.reasons, self.epoch_before = Counter(), Counter(), 0

    def to_checkpoint(self, epoch_count: int) -> dict[str, Any]:
        return {"epoch": epoch_count, "total": self.total_before, "reasons": dict(self.reasons)}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any] | None, main_process: bool) -> SkipCounts:
        saved = saved or {}
        reasons = Counter(saved.get("reasons", {})) if main_process else Counter()
        return cls(epoch_before=saved.get("epoch", 0), total_before=saved.get("total", 0), reasons=reasons)


@dataclass
class TrainState:
    """Where a pretraining run is; the first five fields and ``skipped`` are stored in every checkpoint's
    ``trainer_state.json``."""

    step: int = 0  # optimisation steps done
    epoch: int = 0
    last_log: dict[str, float] = field(default_factory=dict)  # the latest logged values (the summary reads them)
    init: Any = None  # what ``model.init`` loaded at the fresh start (sslvit.weights.describe_init)
    budget: dict[str, Any] | None = None  # the ``train.budget_minutes`` plan, kept by a resumed run
    bad_in_a_row: int = 0  # non-finite steps in a row (train.max_bad_steps stops the run)
    skipped: SkipCounts = field(default_factory=SkipCounts)  # undecodable samples, this epoch and in all

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], main_process: bool = True) -> TrainState:
        """The state a checkpoint's trainer state records (``main_process``: whether to take its skip reasons)."""
        skipped = SkipCounts.from_checkpoint(saved.get("skipped"), main_process)
        return cls(
            saved["step"],
            saved.get("epoch", 0),
            saved.get("last_log", {}),
            saved.get("init"),
            saved.get("budget"),
            skipped=skipped,
        )

    def to_checkpoint(
        self, recipe_name: str, world_size: int, encoder_info: dict[str, Any], skipped_this_epoch: int = 0
    ) -> dict[str, Any]:
        """The trainer state to store: this state, the run's recipe and world size, the encoder's identity.

        ``skipped_this_epoch``: :meth:`SkipCounts.epoch_count` at this step (summed over processes).
        """
        saved = {
            "step": self.step,
            "epoch": self.epoch,
            "recipe": recipe_name,
            "world_size": world_size,
            "last_log": self.last_log,
            "init": self.init,
            "skipped": self.skipped.to_checkpoint(skipped_this_epoch),
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
