"""One optimisation step and the machinery around it: micro-batches, the logging window, the bad-step guard.

:func:`optimisation_step` is the very step the pretraining loop runs, the budget probe times and
``benchmarks/throughput.py`` measures.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from sslvit.accel import plain_tensor
from sslvit.checkpoint import latest_checkpoint
from sslvit.data.augment import render_on_device
from sslvit.errors import TrainingDiverged
from sslvit.objectives import Progress
from sslvit.recipe import Recipe
from sslvit.training.accumulate import MicroBatches, accumulate_gradients
from sslvit.training.derived import Derived
from sslvit.training.schedules import apply_schedules
from sslvit.training.signals import stop_requested
from sslvit.training.state import SkipCounts, StepResult, Trainer

log = logging.getLogger("sslvit")


def optimisation_step(trainer: Trainer, batches: MicroBatches, step: int) -> StepResult:
    """Optimisation step ``step`` (0-based) over ``grad_accum_steps`` micro-batches of ``batches``.

    Gradients are synchronised across processes only on the last micro-batch. A step whose loss or gradient norm
    is NaN/Inf leaves the weights untouched (under fp16 the gradient scaler still sees it and backs off), and the
    objective's ``after_step`` (EMA, centre) runs only after a finite step.
    """
    objective, optimizer, recipe = trainer.objective, trainer.optimizer, trainer.recipe
    progress = Progress(step, trainer.derived.total_steps, recipe.schedule.epochs)
    # schedules: the loop's lr and weight decay, then the objective's own (temperatures, ...)
    inclusive = objective.warmup_reaches_base_at_last_step
    scheduled = apply_schedules(optimizer, recipe.optim, trainer.derived, step, inclusive)
    objective.before_step(progress)
    # forward and backward over the micro-batches
    where = f"data.path={recipe.data.path}"
    epoch, outputs, skipped = accumulate_gradients(
        trainer.accelerator, trainer.model, batches, trainer.derived.grad_accum_steps, trainer.model, where
    )
    objective.after_backward(progress)
    # clip, then step unless something was not finite (every process takes the same decision)
    accelerator = trainer.accelerator
    grad_norm = plain_tensor(
        accelerator.clip_grad_norm_(trainer.model.parameters(), recipe.optim.clip_grad or math.inf)
    )
    finite = torch.isfinite(grad_norm) & torch.isfinite(outputs["loss"])
    stop = stop_requested() is not None
    if accelerator.num_processes > 1:  # the same all-reduce carries the stop request: all stop after this step
        flags = torch.stack([finite.float(), torch.tensor(float(stop), device=finite.device)])
        good, asked = accelerator.reduce(flags, reduction="sum").tolist()
        finite, stop = good == accelerator.num_processes, asked > 0
    finite = bool(finite)  # the one host sync per step: the guard against NaN/Inf needs it
    if finite or accelerator.scaler is not None:
        optimizer.step()
        finite = finite and not optimizer.step_was_skipped
    optimizer.zero_grad(set_to_none=True)
    # the objective's state (EMA teacher, centre) follows good steps only
    if finite:
        scheduled.update(objective.after_step(progress))
    return StepResult(epoch, outputs, grad_norm, finite, scheduled, skipped, stop)


def handle_bad_step(accelerator: Accelerator, recipe: Recipe, run_dir: Path, step: int, in_a_row: int) -> None:
    """Warn about a skipped non-finite step; stop the run after ``train.max_bad_steps`` of them in a row."""
    if accelerator.is_main_process:
        log.warning("step %d: non-finite loss or gradient norm; the step was skipped (%d in a row)", step, in_a_row)
    if in_a_row < recipe.train.max_bad_steps:
        return
    good = latest_checkpoint(run_dir / "checkpoints")  # now, not at the start: checkpoints were written since
    raise TrainingDiverged(
        f"step {step}: {in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
        f"{recipe.train.max_bad_steps}); the last good checkpoint is {good or 'none (no checkpoint yet)'}. "
        "Usual remedies: train.precision=bf16 instead of fp16, a lower optim.base_lr, gradient clipping "
        "(optim.clip_grad=1.0), a longer schedule.warmup_epochs"
    )


def micro_batches(
    accelerator: Accelerator, loader: Any, streaming: bool, epoch: int, skip: int, per_epoch: int
) -> MicroBatches:
    """Yield (epoch, micro-batch) from position (epoch, skip) on, epochs chained; the loop stops at total steps."""
    while True:
        for batch in _epoch_batches(accelerator, loader, epoch, skip, per_epoch, streaming):
            yield epoch, render_on_device(loader.dataset, batch)  # data.augment_on=device renders the views here
        epoch, skip = epoch + 1, 0


def _epoch_batches(accelerator: Accelerator, loader: Any, epoch: int, skip: int, per_epoch: int, streaming: bool):
    """The micro-batches of one epoch on the training device, the first ``skip`` left out (resume mid-epoch).

    A map-style epoch is cut at ``per_epoch`` micro-batches so that it ends on a whole optimisation step.
    """
    if streaming:  # not prepared by Accelerate (see pretrain): skip by reading, move to the device here
        loader.dataset.set_epoch(epoch)
        return (send_to_device(b, accelerator.device) for b in itertools.islice(loader, skip, None))
    loader.set_epoch(epoch)  # the sampler's order
    loader.dataset.set_epoch(epoch)  # the augmentations
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    return itertools.islice(batches, per_epoch - skip)


def report_skipped(accelerator: Accelerator, skipped: SkipCounts, epoch: int, step: int, ended: bool) -> None:
    """Say how many samples epoch ``epoch`` (0-based) skipped (all processes) and why (the main process's reasons),
    and how many the run skipped in all; ``ended``: the epoch is over, so its count moves into the total.

    A collective: every process calls it at the same step.
    """
    this_epoch = skipped.epoch_count(accelerator)
    total = skipped.total_before + this_epoch
    accelerator.log({"data/skipped": this_epoch, "data/skipped_total": total}, step=step)
    if this_epoch and accelerator.is_main_process:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.reasons.most_common()) or "none here"
        log.warning(
            "epoch %d%s: skipped %d undecodable sample(s) (%s on the main process); %d in all so far",
            epoch + 1,
            "" if ended else " (so far)",
            this_epoch,
            reasons,
            total,
        )
    if ended:
        skipped.end_epoch(this_epoch)


class LogWindow:
    """Logging between two log steps: sums on device (no host sync per step), the progress bar, images/s."""

    def __init__(self, accelerator: Accelerator, recipe: Recipe, derived: Derived, step: int, last: dict) -> None:
        self.accelerator, self.every, self.total = accelerator, recipe.log.every, derived.total_steps
        self.global_batch = derived.global_batch_size
        # the bar redraws in place: on a terminal only; a log file gets one line every log.every steps instead
        self.lines = accelerator.is_local_main_process and not sys.stderr.isatty()
        hidden = not accelerator.is_local_main_process or self.lines
        self.bar = tqdm(total=self.total, initial=step, disable=hidden, desc="pretrain")
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.bad, self.last = 0, 0, last
        self.started = self.since = time.perf_counter()

    def add(self, step: int, result: StepResult) -> None:
        """Count step ``step`` (1-based: steps done); log the window when ``log.every`` divides it."""
        if result.finite:
            for key, value in result.outputs.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.steps += 1
        self.bad += not result.finite
        self.bar.update(1)
        if step % self.every == 0 or step == self.total:
            self._log(step, result.scheduled, result.grad_norm)

    def _log(self, step: int, scheduled: dict, grad_norm: torch.Tensor) -> None:
        """Average over the window's good steps and over processes, then log: one host sync per log step."""
        now = time.perf_counter()
        values = {"train/images_per_s": (self.steps + self.bad) * self.global_batch / (now - self.since)}
        if self.sums:
            keys = sorted(self.sums)
            means = self.accelerator.reduce(torch.stack([self.sums[k] for k in keys]) / self.steps, reduction="mean")
            values.update({f"train/{k}": v for k, v in zip(keys, means.tolist())})
        values.update({f"train/{k}": v for k, v in scheduled.items()})
        values.update({"train/grad_norm": float(grad_norm), "train/bad_steps": self.bad})
        self.accelerator.log(values, step=step)
        self.last = {k.removeprefix("train/"): v for k, v in values.items()}
        if "loss" in self.last:
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", img_s=f"{self.last['images_per_s']:.0f}")
        if self.lines:
            loss = f"loss {self.last['loss']:.4f}, " if "loss" in self.last else ""
            rate = self.last["images_per_s"]
            log.info("step %d/%d: %slr %.3g, %.0f images/s", step, self.total, loss, self.last["lr"], rate)
        self.sums, self.steps, self.bad, self.since = {}, 0, 0, now

    def close(self, step: int, ran: int) -> dict[str, Any]:
        """Summary of this invocation: ``ran`` steps (0 when the run was already complete)."""
        self.bar.close()
        images_per_s = ran * self.global_batch / (time.perf_counter() - self.started) if ran else None
        return {
            "steps": step,
            "steps_this_run": ran,
            "final_loss": self.last.get("loss"),
            "images_per_s": images_per_s,
            "knn_top1": self.last.get("knn_top1"),
        }
