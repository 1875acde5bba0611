"""One way to build the Accelerator, for pretraining, evaluation and fine-tuning alike.

Accelerate ignores a multi-process launch on a machine without a GPU unless it is told ``cpu=True``: each
process would then run alone (and they would overwrite each other's files). With it, they join one gloo group.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``), known before any Accelerator exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def make_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(**kwargs)`` that joins every launched process, on GPUs or on the CPU.

    Raises:
        RuntimeError: fewer processes joined than the launcher started.
    """
    accelerator = Accelerator(cpu=not has_accelerator(), **kwargs)
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"launched {launched_world_size()} processes but Accelerate joined {accelerator.num_processes}"
        )
    return accelerator
