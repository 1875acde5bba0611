"""Gradient accumulation: the one idiom pretraining and fine-tuning share.

An optimisation step runs the forward and backward of ``accum`` micro-batches. Each loss is divided by ``accum``,
so the gradients are those of the mean over the step's micro-batches, and processes all-reduce their gradients
only on the last one (``accelerator.no_sync`` before it). The Accelerator is built without
``gradient_accumulation_steps``: the loop, not ``accelerator.accumulate``, decides when the optimizer steps, and an
epoch is cut at a whole number of steps (see :func:`sslvit.training.loop.micro_batches`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

from sslvit.errors import DataError

MicroBatches = Iterator[tuple[int, dict[str, Any]]]  # (epoch, collated micro-batch), endless
Forward = Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # micro-batch -> outputs with the "loss" to minimise


def accumulate_gradients(
    accelerator: Accelerator, model: torch.nn.Module, batches: MicroBatches, accum: int, forward: Forward, where: str
) -> tuple[int, dict[str, torch.Tensor], Counter[str]]:
    """Forward and backward over the next ``accum`` micro-batches of ``batches``.

    Args:
        model: the prepared model (DDP-wrapped on several processes) whose gradients sync on the last micro-batch.
        forward: runs ``model`` on a collated micro-batch (``views``, ``labels``); returns scalar tensors, ``loss``
            among them.
        where: the data, as the error below names it (e.g. ``data.path=/data/imagenet``).

    Returns:
        ``(epoch of the micro-batches, outputs averaged over them (detached, float32), skipped samples by reason)``.

    Raises:
        DataError: every image of a micro-batch failed to decode (under DDP every process must take every step).
    """
    sums: dict[str, torch.Tensor] = {}
    skipped: Counter[str] = Counter()
    for i in range(accum):
        epoch, batch = next(batches)
        if batch["views"] is None:
            failed = Counter(batch["skipped"])
            reasons = ", ".join(f"{reason}: {n}" for reason, n in failed.most_common())
            raise DataError(
                f"every image of a batch failed to decode ({failed.total()} skipped: {reasons}); check the images "
                f"at {where}"
            )
        skipped.update(batch["skipped"])
        sync = i == accum - 1 or accelerator.num_processes == 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = forward(batch)
            accelerator.backward(out["loss"] / accum)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
    return epoch, sums, skipped
