"""Writing a run folder: resumable training state (Accelerate) and the encoder export (timm ``local-dir``).

The layout (``RUN/checkpoints/step_*``, ``RUN/encoder/``) and every read of it are :mod:`sslvit.weights`. Every
folder is written under a temporary name and renamed when complete, so a kill while saving leaves the previous
checkpoint (or export) intact and resume never picks a half-written one.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import save_for_hf

from sslvit.errors import CheckpointError
from sslvit.weights.run import (
    TRAINER_STATE,
    checkpoint_name,
    complete_checkpoints,
    latest_checkpoint,
    read_trainer_state,
    step_of,
)
from sslvit.weights.sources import share_by_umask

# timm's data config of every export (local-dir and Hub): our preprocessing, not the defaults of the timm weights
# tag the architecture's name points at
DATA_CONFIG = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic"}


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
    accelerator.wait_for_everyone()  # every process has written its files (FSDP: its shard, last of all on rank 0)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        # rotate among the checkpoints up to this step: a newer one (left out as damaged when the run resumed) is
        # replaced when training reaches its step, and never removed in place of a good one
        for old in [c for c in complete_checkpoints(root) if step_of(c) <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


DAMAGED_ADVICE = (
    "If the checkpoint is damaged, delete that folder to resume from the one before, or use a new --output-dir"
)


def load_checkpoint(accelerator: Any, checkpoint: Path, advice: str = DAMAGED_ADVICE) -> dict[str, Any]:
    """Restore the full training state from ``checkpoint``; return its trainer state.

    Everything is read with safetensors or ``torch.load(weights_only=True)`` (Accelerate's default), so a
    file crafted to run code when unpickled is refused instead of executed.

    Raises:
        CheckpointError: "cannot resume from CHECKPOINT: what failed", then ``advice`` ("" for none).
    """
    try:
        accelerator.load_state(str(checkpoint))
        return read_trainer_state(checkpoint)
    except (pickle.UnpicklingError, RuntimeError, OSError, KeyError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"cannot resume from {checkpoint}: {first_line}"
        raise CheckpointError(f"{message}. {advice}" if advice else message) from err


def export_encoder(encoder: torch.nn.Module, architecture: str, args: dict[str, Any], out_dir: Path) -> Path:
    """Write ``encoder`` in timm's ``local-dir`` layout with timm's own ``save_for_hf``.

    ``timm.create_model("local-dir:" + str(out_dir), pretrained=True)`` then rebuilds it with the same shape
    (``args`` are the ``create_model`` keyword arguments) and identical weights.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    provenance = {"pretrained_cfg": {"tag": "sslvit", "license": None, "hf_hub_id": None}}  # ours, not a timm tag's
    save_for_hf(
        encoder, str(tmp), model_config=provenance, model_args=args, data_config=DATA_CONFIG, safe_serialization=True
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
    share_by_umask(out_dir.iterdir())  # safetensors writes 0600; teammates should read the encoder like its config
    return out_dir
