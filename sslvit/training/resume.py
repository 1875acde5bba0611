"""Which checkpoint a pretraining run resumes from, and refusing one that belongs to another model.

Resume walks back from the newest checkpoint to the newest one that loads: :func:`resumable_checkpoints` leaves out
the damaged ones (a truncated weights file, an unreadable ``trainer_state.json``, a missing RNG file) with a warning
saying which and why, :func:`refuse_another_model` stops before anything in the folder is written when the newest
one holds another model's shapes, and :func:`resume` loads the first that loads on every process. Nothing is
deleted: a damaged checkpoint is replaced when training reaches its step again (or rotated out later).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from sslvit.checkpoint import load_checkpoint
from sslvit.errors import CheckpointError
from sslvit.recipe import Recipe
from sslvit.training.state import TrainState
from sslvit.weights.run import RunFolder, checkpoint_problem, complete_checkpoints

log = logging.getLogger("sslvit")

MAX_KEYS_NAMED = 8  # in the refusal message


def resumable_checkpoints(accelerator: Accelerator, run: RunFolder) -> list[Path]:
    """The complete checkpoints that look whole, newest first (the main process decides, every process gets it).

    Raises:
        CheckpointError: there are checkpoints, but none looks whole (the run must not restart from scratch over them).
    """
    found: list[str] = []
    if accelerator.is_main_process:
        damaged = []
        for checkpoint in reversed(complete_checkpoints(run.checkpoints)):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                found.append(str(checkpoint))
            else:
                damaged.append(f"{checkpoint.name}: {problem}")
                log.warning("checkpoint %s is skipped: %s (nothing is deleted)", checkpoint, problem)
        if damaged and not found:
            found = ["!" + "; ".join(damaged)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found = broadcast_object_list([found], from_process=0)[0]
    if found and found[0].startswith("!"):
        raise CheckpointError(
            f"no checkpoint in {run.checkpoints} can be resumed from ({found[0][1:]}); move the damaged ones aside "
            "to start this run afresh, or use another --output-dir"
        )
    return [Path(p) for p in found]


def refuse_another_model(run: RunFolder, checkpoint: Path, recipe: Recipe, objective: torch.nn.Module) -> None:
    """Raise when ``checkpoint``'s weights do not fit ``objective`` (another recipe's model or shape).

    Compares the tensor names and shapes in its ``model.safetensors`` (header only) with the objective's; the message
    names the recipe fields that differ from the run's ``config.json`` (or, without one, the differing tensors).

    Raises:
        CheckpointError: one line naming the differing keys.
    """
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    expected = {key: tuple(value.shape) for key, value in objective.state_dict().items()}
    differing = sorted(k for k in stored.keys() | expected.keys() if stored.get(k) != expected.get(k))
    if not differing or all(k not in stored and _shares_storage(objective, k) for k in differing):
        return
    fields = _differing_fields(run.recipe(), recipe.to_dict())
    if fields:
        named = ", ".join(f"{k} ({old!r} there, {new!r} here)" for k, old, new in fields[:MAX_KEYS_NAMED])
    else:
        named = "tensors " + ", ".join(
            f"{k} ({stored.get(k)} there, {expected.get(k)} here)" for k in differing[:MAX_KEYS_NAMED]
        )
    more = f" and {len(fields or differing) - MAX_KEYS_NAMED} more" if len(fields or differing) > MAX_KEYS_NAMED else ""
    raise CheckpointError(
        f"{run.root} holds a run of another model (recipe {run.recipe().get('name', '?')!r}); this recipe "
        f"({recipe.name!r}) cannot resume {checkpoint.name}: differing keys: {named}{more}. Use another --output-dir "
        "for this recipe (nothing in that folder was changed)"
    )


def _shares_storage(objective: torch.nn.Module, key: str) -> bool:
    """Whether state-dict entry ``key`` aliases another entry (Accelerate saves shared tensors once)."""
    state = objective.state_dict()
    ptr = state[key].data_ptr() if key in state else None
    return ptr is not None and any(k != key and v.data_ptr() == ptr for k, v in state.items())


def _differing_fields(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The ``model.*`` and ``objective.*`` fields that differ between two resolved recipes (``model.init`` aside:
    it only acts at a fresh start)."""
    out = []
    for section in ("objective", "model"):
        before, after = old.get(section) or {}, new.get(section) or {}
        keys = sorted(before.keys() | after.keys())
        if section == "objective" and before.get("name") != after.get("name"):
            keys = ["name"]  # another objective: its other fields differ by nature
        for key in keys:
            if (section, key) != ("model", "init") and before.get(key) != after.get(key):
                out.append((f"{section}.{key}", before.get(key), after.get(key)))
    return out


def resume(accelerator: Accelerator, checkpoints: list[Path], init: Any) -> TrainState:
    """Restore the prepared objects from the first of ``checkpoints`` that loads on every process; else start fresh.

    ``init`` is what ``model.init`` loaded (a fresh start only).

    Raises:
        CheckpointError: there were checkpoints and none of them loads.
    """
    failures = []
    for checkpoint in checkpoints:
        error = None
        try:
            saved = load_checkpoint(accelerator, checkpoint, advice="")
        except CheckpointError as err:
            error = str(err)
        if not _anywhere(accelerator, error is not None):
            _log_resumed(accelerator, checkpoint, saved)
            return TrainState.from_checkpoint(saved, accelerator.is_main_process)
        error = error or f"cannot resume from {checkpoint}: another process could not load it"
        failures.append(error)
        if accelerator.is_main_process:
            log.warning("%s; trying the checkpoint before it (nothing is deleted)", error)
    if failures:
        raise CheckpointError(
            f"{'; '.join(failures)}; no checkpoint loads: move the damaged ones aside to start afresh, or use another "
            "--output-dir"
        )
    return TrainState(init=init)


def _anywhere(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a collective)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)


def _log_resumed(accelerator: Accelerator, checkpoint: Path, saved: dict[str, Any]) -> None:
    if not accelerator.is_main_process:
        return
    log.info("resuming from %s (step %d)", checkpoint, saved["step"])
    written_by = saved.get("world_size", accelerator.num_processes)
    if written_by != accelerator.num_processes:
        log.warning(
            "the checkpoint was written by %d process(es) and resumes on %d: weights, optimizer and schedules "
            "are restored, but the data order (and the random masks) change from here on",
            written_by,
            accelerator.num_processes,
        )
