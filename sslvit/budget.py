"""``train.budget_minutes``: fit the whole schedule into a wall-clock budget, decided once at the start of a run.

Every schedule (learning-rate warmup and cosine, weight decay, teacher temperature and momentum, the frozen last
layer) is a function of ``(step, total_steps)``, so the total must be known before the first step. The loop
therefore times a few optimisation steps on the real data first (loader, augmentation, forward and backward,
optimizer, the objective's hooks) and then undoes them: the objective's weights and buffers (a DINO centre,
BatchNorm statistics), the optimizer state, the gradient scaler and every RNG are restored, and the data restarts
at its first batch. A budget run is therefore the same run as ``train.max_steps=<the total it chose>``, bit for bit.

The total is what fits in the budget after the time already spent (process start, building, data, the probe),
less a margin for what the probe does not time (checkpoints, image logs, the final export): the run's own
startup counts against the budget. The decision is stored in every checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger("sslvit")

PROBE_WARMUP_STEPS = 1  # not timed: first-batch latency, lazy initialisation, allocator warm-up
PROBE_MIN_STEPS = 3
PROBE_SECONDS = (5.0, 30.0)  # time at least 1% of the budget, clamped to this range
PROBE_MAX_FRACTION = 0.05  # and never more than 5% of it
END_MARGIN = 0.03  # of the remaining time: checkpoints, image logs, the final export, timing noise


@dataclass(frozen=True)
class BudgetPlan:
    """What the loop decided for ``train.budget_minutes`` (stored in ``trainer_state.json`` as ``budget``)."""

    minutes: float
    total_steps: int
    seconds_per_step: float  # the probe's mean over its timed steps
    probe_steps: int  # timed steps (after PROBE_WARMUP_STEPS untimed ones)
    startup_seconds: float  # from the start of the run to the end of the probe
    monitor_seconds: float  # one online k-NN evaluation (eval.knn_every), 0 when off

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_budget(
    minutes: float,
    started: float,
    step: Callable[[int], None],
    restore_point: Callable[[], Callable[[], None]],
    sync: Callable[[], None],
    monitor: Callable[[], None] | None = None,
    knn_every: int = 0,
) -> BudgetPlan:
    """Time a few steps of the real loop, undo them, and choose how many steps fit in ``minutes``.

    Args:
        minutes: the budget, counted from ``started`` (a ``time.time()`` value: the start of the run).
        step: runs optimisation step ``i`` (any schedule: it is undone).
        restore_point: saves the training state and returns the function that restores it.
        sync: waits for the device to finish queued work (a no-op on a CPU).
        monitor: one online k-NN evaluation, timed once when ``knn_every`` > 0 (it runs every ``knn_every`` steps
            and at the end, so its cost comes out of the budget).

    Returns:
        The plan; ``total_steps`` is at least 1.
    """
    budget = minutes * 60.0
    timed_for = min(max(0.01 * budget, PROBE_SECONDS[0]), PROBE_SECONDS[1], PROBE_MAX_FRACTION * budget)
    restore = restore_point()
    for i in range(PROBE_WARMUP_STEPS):
        step(i)
    sync()
    begin, timed = time.perf_counter(), 0
    while timed < PROBE_MIN_STEPS or time.perf_counter() - begin < timed_for:
        step(PROBE_WARMUP_STEPS + timed)
        sync()
        timed += 1
        if timed >= PROBE_MIN_STEPS and time.perf_counter() - begin > PROBE_MAX_FRACTION * budget:
            break
    per_step = (time.perf_counter() - begin) / timed
    monitor_s = 0.0
    if monitor is not None and knn_every:
        begin = time.perf_counter()
        monitor()
        monitor_s = time.perf_counter() - begin
    restore()
    spent = time.time() - started
    remaining = (budget - spent) * (1.0 - END_MARGIN)
    # T steps cost T * per_step plus (T / knn_every + 1) monitor runs (every knn_every steps and at the end)
    every = knn_every if monitor_s else 1
    total = max(int((remaining - monitor_s) / (per_step + monitor_s / every)), 1)
    return BudgetPlan(minutes, total, per_step, timed, spent, monitor_s)


def training_restore_point(objective: torch.nn.Module, optimizer: Any, scaler: Any) -> Callable[[], None]:
    """Save what a training step changes; return the function that puts it back.

    Saved: the objective's state dict (parameters and buffers, cloned), the optimizer state, the gradient scaler,
    and the torch (CPU and CUDA), numpy and python RNGs.
    """
    weights = {name: tensor.detach().clone() for name, tensor in objective.state_dict().items()}
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    optimizer_state = copy.deepcopy(inner.state_dict())
    scaler_state = scaler.state_dict() if scaler is not None else None
    rngs = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore() -> None:
        objective.load_state_dict(weights)
        inner.load_state_dict(optimizer_state)
        inner.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore


def describe(plan: BudgetPlan) -> str:
    """One log line: the measured rate and the chosen total."""
    knn = f", one online k-NN {plan.monitor_seconds:.1f} s" if plan.monitor_seconds else ""
    return (
        f"train.budget_minutes={plan.minutes:g}: {plan.seconds_per_step:.3f} s/step measured over {plan.probe_steps} "
        f"steps (then undone){knn}; {plan.startup_seconds:.1f} s spent before training; "
        f"{plan.total_steps} steps fit in the rest"
    )
