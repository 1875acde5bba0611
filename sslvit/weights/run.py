"""An sslvit run folder as one object, and the on-disk layout of its checkpoints.

Layout of a run folder (``runs/<recipe>`` unless ``--output-dir``)::

    RUN/config.json                  the resolved recipe (+ derived values)
    RUN/tensorboard/                 the training logs
    RUN/checkpoints/step_00001000/   Accelerate's save_state (model, optimizer, RNG) + trainer_state.json
    RUN/encoder/                     config.json + model.safetensors in timm's ``local-dir:`` layout

A checkpoint counts once its ``trainer_state.json`` is there: :mod:`sslvit.checkpoint` writes every folder under a
temporary name and renames it when complete, so a half-written one is never picked. A complete one can still be
damaged later (a truncated copy, a full disk on another tool's write): :func:`checkpoint_problem` says what is wrong
with one without loading it, so that resume can walk back to the newest checkpoint that loads.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
RNG_STATE = "random_states_{}.pkl"  # Accelerate's per-process RNG file


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint written after ``step`` steps: ``step_00001000``."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    named = (p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))
    found = [p for p in named if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]
    found = [p for p in found if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json``: step, the encoder's architecture, model_args and key prefix, ..."""
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint folder's name records: ``step_00001000`` -> 1000."""
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint, found without loading it (None: it looks whole).

    Checks that ``trainer_state.json`` is a JSON object with an integer ``step``, that every ``.safetensors`` file's
    header parses and covers the file (a truncated copy does not), that every ``.bin``/``.pkl``/``.pt`` file (torch's
    zip format) has its central directory (it is at the end: truncation removes it), and that the RNG file of every
    process that wrote the checkpoint is there (without it a resume would not be exact).
    """
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({_first_line(err)})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{TRAINER_STATE} records no step"
    files = sorted(p for p in checkpoint.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    sharded = [p for p in checkpoint.glob("pytorch_model_fsdp*") if p.is_dir()]  # FSDP: distributed checkpoint
    if not weights and not sharded and not any(p.name.startswith("pytorch_model") for p in files):
        return "it holds no model weights (model.safetensors)"
    for folder in (*sharded, *(p for p in checkpoint.glob("optimizer_*") if p.is_dir())):
        if not (folder / ".metadata").is_file():  # written last, once every process wrote its shard
            return f"{folder.name}/.metadata missing (an incomplete sharded checkpoint)"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return f"{path.name} is damaged ({problem})"
    for path in (p for p in files if p.suffix in (".bin", ".pkl", ".pt")):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is damaged (truncated or not a torch file)"
    world_size = state.get("world_size", 1)
    missing = [RNG_STATE.format(i) for i in range(world_size if isinstance(world_size, int) else 1)]
    missing = [name for name in missing if not (checkpoint / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing (the random state: resuming from it would not be exact)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError, ValueError) as err:
        return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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

    @property
    def lock_file(self) -> Path:
        """Present while a run writes the folder (:mod:`sslvit.runlock`)."""
        return self.root / "run.lock"

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
