"""One way to build the Accelerator, for pretraining, evaluation and fine-tuning alike, and ``train.compile``.

Accelerate ignores a multi-process launch on a machine without a GPU unless it is told ``cpu=True``: each
process would then run alone (and they would overwrite each other's files). With it, they join one gloo group.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

log = logging.getLogger("sslvit")


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


class _CompileState:
    """Shared by every compiled block of a run: the first failure switches all of them to eager, with one warning."""

    def __init__(self, warn: bool) -> None:
        self.failed, self.warn = False, warn

    def fail(self, err: BaseException) -> None:
        if not self.failed and self.warn:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning(
                "train.compile: torch.compile failed (%s: %s); training continues eagerly",
                type(err).__name__,
                first[:200],
            )
        self.failed = True


def _guarded(block: nn.Module, compiled: Callable[..., Any], state: _CompileState) -> Callable[..., Any]:
    eager = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not state.failed:
            try:
                return compiled(block, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - no compiler, an unsupported op: any failure means eager
                state.fail(err)
        return eager(*args, **kwargs)  # a block is a pure function of its input: running it again is safe

    return forward


def compile_blocks(model: nn.Module, encoder: nn.Module, backend: str = "inductor", warn: bool = True) -> int:
    """``torch.compile`` every transformer block of ``model`` of the kinds ``encoder.blocks`` holds, in place.

    Regional compilation: the blocks, not the objective's forward. Measured on tiny DINO and MAE (aot_eager): the
    objective's forward recompiled at every DINO step (its Python state changes between steps: 5 s a step),
    while the blocks compile once and sit under every objective (MAE's masking and DINO's multi-crop concatenation
    stay eager around them). ``dynamic=False``: a recipe's crop shapes are fixed (``drop_last``), so each block
    gets a static graph per crop size (DINO: global and local) and grad mode (student, teacher), the fastest
    kernels. Identical blocks share their compiled code. State-dict keys do not change (only ``forward`` is
    replaced on each block), so checkpoints, resume and exports are those of an eager run.

    A failure (no C++ toolchain, an unsupported op), when compiling or at the first call, logs one warning (if
    ``warn``) and every block runs eagerly from then on.

    Returns:
        The number of blocks compiled (0 after a failure or when ``encoder`` has no ``blocks``).
    """
    kinds = {type(block) for block in getattr(encoder, "blocks", [])}
    blocks = [m for m in model.modules() if type(m) in kinds]
    state = _CompileState(warn)
    try:  # the class's forward, the block an argument: dynamo guards on each block's own parameters
        compiled = {kind: torch.compile(kind.forward, backend=backend, dynamic=False) for kind in kinds}
    except Exception as err:  # noqa: BLE001 - an unknown backend, no dynamo on this platform
        state.fail(err)
        return 0
    for block in blocks:
        block.forward = _guarded(block, compiled[type(block)], state)
    return len(blocks)
