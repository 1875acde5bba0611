"""One way to build the Accelerator, for pretraining, evaluation and fine-tuning alike, and ``train.compile``.

Accelerate ignores a multi-process launch on a machine without a GPU unless it is told ``cpu=True``: each
process would then run alone (and they would overwrite each other's files). With it, they join one gloo group.

FSDP on the CPU: Accelerate 1.15 turns an FSDP launch into ``DistributedType.FSDP`` only for GPU-like devices
(``AcceleratorState.__init__`` checks ``ACCELERATE_USE_FSDP`` inside its MULTI_GPU/XPU/NPU/... branch); with
``cpu=True`` it stays ``MULTI_CPU`` and the model is wrapped in DDP, silently. Its FSDP2 code itself
(``fsdp2_prepare_model``, DCP checkpoints, the DTensor-aware gradient clipping) has nothing device-specific, and
torch's ``fully_shard`` runs on gloo, so :func:`make_accelerator` promotes such a launch to FSDP2 itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from sslvit.errors import UserError

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
    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _fsdp2_on_cpu(accelerator)
    return accelerator


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with ``distributed_type: FSDP`` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as an ordinary tensor: a DTensor (under FSDP2 the gradient norm is a replicated one) is gathered.

    Collective for a DTensor: every process must call it. Anything else is returned as it is.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any of ``module``'s parameters is an FSDP2 shard (a DTensor)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def unsharded(module: nn.Module, build: Callable[[], nn.Module], keep: bool = True) -> nn.Module:
    """``module`` itself, or when its parameters are sharded a fresh ``build()`` holding its full (gathered) weights.

    Collective when sharded: every process must call it (each DTensor is gathered with ``full_tensor``, in
    state-dict order, the same on every process). The copy is built only where ``keep`` (the process that exports);
    elsewhere ``module`` is returned. The full state dict is loaded strictly: a key or shape that differs from
    ``build()``'s raises instead of exporting something timm would not load.
    """
    if not is_sharded(module):
        return module
    state = {key: plain_tensor(value).detach().cpu() for key, value in module.state_dict().items()}
    if not keep:
        return module
    plain = build()
    plain.load_state_dict(state, strict=True)
    return plain


@contextlib.contextmanager
def whole_weights(model: nn.Module) -> Iterator[None]:
    """Under FSDP2, every unit of ``model`` unsharded for the block and kept so across forwards; else nothing.

    For the forwards outside a training step (TensorBoard images on the main process, the online k-NN): a
    submodule called on its own (the teacher's backbone) finds whole weights, and no forward inside needs the other
    processes. Collective: every process enters it. Costs the full model's memory for the block's duration.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    reshards = [_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in zip(units, reshards, strict=True):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def _reshards_after_forward(unit: FSDPModule) -> bool:
    # torch 2.14 keeps the setting per parameter group (post_forward_mesh_info None = keep unsharded); no getter
    state = unit._get_fsdp_state()
    return any(group.post_forward_mesh_info is not None for group in state._fsdp_param_groups)


def _fsdp2_on_cpu(accelerator: Accelerator) -> None:
    """Turn a ``MULTI_CPU`` (gloo) Accelerator into FSDP2, as Accelerate does by itself on GPUs.

    The plugin is read from the launcher's ``FSDP_*`` variables, exactly as Accelerate reads it; the state gets
    the two fields its GPU branch would have set (``distributed_type``, ``fsdp_plugin``), so that ``prepare``
    shards the model with ``fully_shard`` and ``save_state``/``load_state`` write and read DCP checkpoints.

    Raises:
        UserError: the config asks for FSDP1, which needs a GPU.
    """
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError(
            f"FSDP on the CPU needs fsdp_version: 2 in the Accelerate config (it has {plugin.fsdp_version}); "
            "FSDP1 runs on GPUs only"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # both shared states: a later AcceleratorState() copies PartialState's distributed_type over its own
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP


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
