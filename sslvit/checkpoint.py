"""Resumable training state and the encoder export.

Layout of a run folder::

    RUN/config.json                  the resolved recipe (+ derived values)
    RUN/checkpoints/step_00001000/   Accelerate's save_state (model, optimizer, RNG) + trainer_state.json
    RUN/encoder/                     config.json + model.safetensors in timm's ``local-dir:`` layout

Every folder is written under a temporary name and renamed when complete, so a kill while saving leaves the
previous checkpoint (or export) intact and resume never picks a half-written one.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import save_for_hf

from sslvit.errors import CheckpointError

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def save_checkpoint(accelerator: Any, root: Path, step: int, keep: int, state: dict[str, Any]) -> Path:
    """Save the full training state for resuming, atomically, and keep only the newest ``keep`` checkpoints.

    Must be called on every process (Accelerate gathers sharded state); only the main process writes files.
    """
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    except OSError as err:  # a full disk, a quota, a vanished mount: the previous checkpoint must survive
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {root}: {err.strerror or err}; the previous checkpoint "
            f"{previous or '(none)'} is intact and the run resumes from it once there is space"
        ) from err
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: Path) -> dict[str, Any]:
    """Restore the full training state from ``checkpoint``; return its trainer state.

    Everything is read with safetensors or ``torch.load(weights_only=True)`` (Accelerate's default), so a
    file crafted to run code when unpickled is refused instead of executed.
    """
    try:
        accelerator.load_state(str(checkpoint))
    except (pickle.UnpicklingError, RuntimeError, OSError, KeyError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {first_line}. If the checkpoint is damaged, delete that folder "
            "to resume from the one before, or use a new --output-dir"
        ) from err
    return read_trainer_state(checkpoint)


def export_encoder(encoder: torch.nn.Module, architecture: str, args: dict[str, Any], out_dir: Path) -> Path:
    """Write ``encoder`` in timm's ``local-dir`` layout with timm's own ``save_for_hf``.

    ``timm.create_model("local-dir:" + str(out_dir), pretrained=True)`` then rebuilds it with the same shape
    (``args`` are the ``create_model`` keyword arguments) and identical weights.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Our own preprocessing and provenance, not the defaults of the timm weights tag the name points at.
    data_config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic"}
    provenance = {"pretrained_cfg": {"tag": "sslvit", "license": None, "hf_hub_id": None}}
    save_for_hf(
        encoder, str(tmp), model_config=provenance, model_args=args, data_config=data_config, safe_serialization=True
    )
    config = json.loads((tmp / "config.json").read_text())
    if config.get("architecture") != architecture:
        raise CheckpointError(f"timm recorded architecture {config.get('architecture')!r}, expected {architecture!r}")
    old = out_dir.with_name(f".old-{out_dir.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_exported_encoder(path: Path) -> torch.nn.Module:
    """Rebuild an encoder from an ``encoder/`` export (config.json + model.safetensors), strictly.

    Raises:
        CheckpointError: files are missing or the weights do not fit the architecture in config.json.
    """
    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not an encoder export: it needs config.json and model.safetensors")
    config = json.loads(config_file.read_text())
    model = _create(config["architecture"], config.get("model_args", {}), config.get("pretrained_cfg", {}))
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit {config['architecture']} {config.get('model_args', {})}: "
            f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    return model.eval()


def encoder_from_checkpoint(checkpoint: Path) -> torch.nn.Module:
    """Rebuild the exportable encoder from a training checkpoint, without knowing the objective.

    ``trainer_state.json`` records the timm architecture, its arguments and the key prefix of the encoder
    inside the objective's state dict (``backbone.vit.`` for MAE).
    """
    state = read_trainer_state(checkpoint)
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint} has no model.safetensors; is it an sslvit training checkpoint?")
    prefix = state["encoder_prefix"]
    tensors = {k.removeprefix(prefix): v for k, v in load_file(str(weights)).items() if k.startswith(prefix)}
    model = _create(state["architecture"], state["model_args"], state)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit {state['architecture']}: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return model.eval()


def _create(architecture: str, args: dict[str, Any], recorded: dict[str, Any]) -> torch.nn.Module:
    """``timm.create_model`` with the recorded ``input_size`` (a CNN's training resolution: no model_args hold it)."""
    overlay = {"input_size": tuple(recorded["input_size"])} if recorded.get("input_size") else None
    return timm.create_model(architecture, pretrained=False, pretrained_cfg_overlay=overlay, **args)


def export_run(run_dir: Path) -> Path:
    """Write ``RUN_DIR/encoder/`` from the run's newest complete checkpoint."""
    checkpoint = latest_checkpoint(Path(run_dir) / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint under checkpoints/; is it an sslvit run folder?")
    state = read_trainer_state(checkpoint)
    encoder = encoder_from_checkpoint(checkpoint)
    return export_encoder(encoder, state["architecture"], state["model_args"], Path(run_dir) / "encoder")
