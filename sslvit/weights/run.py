"""An sslvit run folder as one object, and the on-disk layout of its checkpoints.

Layout of a run folder (``runs/<recipe>`` unless ``--output-dir``)::

    RUN/config.json                  the resolved recipe (+ derived values)
    RUN/tensorboard/                 the training logs
    RUN/checkpoints/step_00001000/   Accelerate's save_state (model, optimizer, RNG) + trainer_state.json
    RUN/encoder/                     config.json + model.safetensors in timm's ``local-dir:`` layout

A checkpoint counts once its ``trainer_state.json`` is there: :mod:`sslvit.checkpoint` writes every folder under a
temporary name and renames it when complete, so a half-written one is never picked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint written after ``step`` steps: ``step_00001000``."""
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
    """The checkpoint's ``trainer_state.json``: step, the encoder's architecture, model_args and key prefix, ..."""
    return json.loads((checkpoint / TRAINER_STATE).read_text())


@dataclass(frozen=True)
class RunFolder:
    """One sslvit run folder: its paths, its newest complete checkpoint, its recorded recipe and trainer state."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def encoder(self) -> Path:
        """The export: ``timm.create_model("local-dir:" + str(run.encoder), pretrained=True)``."""
        return self.root / "encoder"

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.checkpoints)

    def recipe(self) -> dict[str, Any]:
        """The resolved recipe recorded at the start of the run (``{}`` if there is none)."""
        return json.loads(self.config_file.read_text()) if self.config_file.is_file() else {}

    def trainer_state(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's trainer state, or None before the first checkpoint."""
        checkpoint = self.latest_checkpoint()
        return read_trainer_state(checkpoint) if checkpoint else None

    @classmethod
    def of(cls, folder: Path) -> RunFolder | None:
        """The run a checkpoint (``RUN/checkpoints/step_*``) or an export (``RUN/encoder``) lives in, else None."""
        if (folder / TRAINER_STATE).is_file():
            return cls(folder.parents[1]) if folder.parent.name == "checkpoints" else None
        parent = cls(folder.parent)
        looks_like_run = parent.checkpoints.is_dir() or parent.config_file.is_file()
        return parent if folder.parent.name != "" and looks_like_run else None
