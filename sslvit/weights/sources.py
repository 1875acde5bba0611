"""The one resolver: any source of encoder weights -> the tensors in timm's key names plus the recorded architecture.

A source (``--encoder``, ``model.init``, the run that ``sslvit export`` writes out) is one of:

- an sslvit run folder (its ``encoder/`` export, else its newest complete checkpoint),
- an ``encoder/`` export, i.e. a folder in timm's ``local-dir`` layout (config.json + model.safetensors), also
  written ``local-dir:PATH`` as timm spells it,
- a training checkpoint folder (``checkpoints/step_*``, read through ``trainer_state.json``),
- a ``.safetensors``/``.pth`` file: timm weights, or the official MAE/DINO formats (facebookresearch/mae
  ``{'model': ...}`` with ``decoder_*`` and ``mask_token`` left out; facebookresearch/dino ``teacher``/``student``
  dicts with ``backbone.``/``module.backbone.`` prefixes, or a plain backbone state dict); the shape of a standard
  ViT (tiny/small/base/large/huge) is read from the tensors,
- a timm model name with a weights file (``--encoder vit_base_patch16_224 --weights mae_pretrain_vit_base.pth``),
  or with ``random``: a seeded random init, the baseline an evaluation compares against.

Files are read with safetensors or ``torch.load(weights_only=True)`` (only ``argparse.Namespace``, which both
official repos store as ``args``, is allowed beyond tensors): nothing else is ever unpickled.

Every read goes through :func:`reading`, the one place where a failure to read a file (a text file, an empty or
truncated ``.safetensors``, a pickle of arbitrary objects, an empty ``trainer_state.json``) becomes one
:class:`~sslvit.errors.CheckpointError` naming the file and what is wrong with it. A run folder whose export or newest
checkpoint cannot be read falls back to the newest one that can, with a warning naming what was skipped and why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from sslvit.errors import CheckpointError
from sslvit.weights.fit import PATCH_KERNEL, build_model, create_model, vit_depth
from sslvit.weights.run import TRAINER_STATE, RunFolder, complete_checkpoints, read_trainer_state

log = logging.getLogger("sslvit.weights")
LOCAL_DIR = "local-dir:"
DROPPED_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")  # MAE decoder, DINO projection head, classifiers
# embed_dim -> (size name, depth, num_heads) of the standard ViTs, for reading the shape of a bare weights file
STANDARD_VITS = {
    192: ("tiny", 12, 3),
    384: ("small", 12, 6),
    768: ("base", 12, 12),
    1024: ("large", 24, 16),
    1280: ("huge", 32, 16),
}
RANDOM = "random"
# what to say when a timm model name comes without its weights, by the option that named it
NAME_WITHOUT_WEIGHTS = {"--encoder": "add --weights FILE (or --weights random)"}


@dataclass
class EncoderWeights:
    """An encoder's tensors in timm's key names, where they came from, and the architecture they fit."""

    state: dict[str, torch.Tensor]
    kind: str  # export, checkpoint, or a file format: mae, dino-teacher, dino-student, state_dict, plain
    path: Path | None  # the folder or file actually read (None: a random init)
    sha256: str  # first 16 hex digits of the sha256 of the weights file (a random init: of its tensors)
    architecture: str | None = None  # the timm name: recorded by sslvit, given with the file, or read from its shapes
    model_args: dict[str, Any] = field(default_factory=dict)  # the timm.create_model arguments that rebuild it
    input_size: list[int] | None = None  # the recorded training resolution (a CNN's model_args cannot hold it)
    run: RunFolder | None = None  # the sslvit run folder it lives in, if any
    ignored: list[str] = field(default_factory=list)  # tensors of the source that are not the encoder's
    step: int | None = None  # the optimisation step of a training checkpoint (None: not recorded)

    def build(self, what: str | None = None) -> torch.nn.Module:
        """The encoder these weights describe, built by the one builder (:func:`~sslvit.weights.fit.build_model`).

        Raises:
            CheckpointError: the architecture is unknown, or a tensor does not fit it.
        """
        if self.architecture is None:  # a bare weights file whose shapes are no standard ViT's
            hint = f"give its timm model name: --encoder NAME --weights {self.path}"
            raise CheckpointError(f"cannot tell the ViT shape of {self.path}; {hint}")
        what = what or str(self.path)
        return build_model(self.architecture, self.model_args, self.state, what, input_size=self.input_size)


def resolve(
    spec: str, weights: str | None = None, model_args: dict[str, Any] | None = None, key: str = "--encoder"
) -> EncoderWeights:
    """Read the encoder weights ``spec`` names (see the module docstring for every kind of source).

    Args:
        spec: a run/export/checkpoint folder, ``local-dir:PATH``, a weights file, or a timm model name.
        weights: with a timm model name: the ``.safetensors``/``.pth`` file to load into it, or ``"random"``.
        model_args: with a timm model name: more ``timm.create_model`` arguments (``patch_size=4``).
        key: the option that named the source, for messages (``--encoder``, ``model.init``).

    Raises:
        CheckpointError: the spec names nothing loadable (one sentence naming ``key``).
    """
    path = Path(spec.removeprefix(LOCAL_DIR)).expanduser()
    if spec.startswith(LOCAL_DIR) and not path.is_dir():
        raise CheckpointError(f"{key}={spec}: {path} is not a folder (local-dir: names a timm local-dir export)")
    if (weights or model_args) and path.exists():
        raise CheckpointError(f"--weights and --model-args go with a timm model name, not with {spec}")
    if path.is_dir():
        return read_folder(path)
    if path.is_file():
        return read_file(path)
    if spec in timm.list_models():
        if weights is None:
            hint = NAME_WITHOUT_WEIGHTS.get(key, "download its weights file and give that path")
            raise CheckpointError(f"{key} {spec} is a timm model name: {hint}")
        args = {**(model_args or {}), "num_classes": 0}
        return random_init(spec, args) if weights == RANDOM else read_file(Path(weights).expanduser(), spec, args)
    raise CheckpointError(
        f"{key}={spec} is neither a folder nor a file, so it is not a run folder, an encoder/ export "
        "(local-dir:PATH), a checkpoint folder or a weights file (.safetensors/.pth), and it is no timm model name "
        "(--encoder vit_base_patch16_224 --weights mae_pretrain_vit_base.pth); Hub names need the network, so "
        "download the weights file and give its path"
    )


def folder_kind(path: Path) -> str | None:
    """``"checkpoint"`` (it has a ``trainer_state.json``), ``"export"`` (config.json + model.safetensors) or None."""
    if (path / TRAINER_STATE).is_file():
        return "checkpoint"
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return "export"
    return None


def run_candidates(run: RunFolder, checkpoints_only: bool = False) -> list[Path]:
    """Where a run folder's encoder can be read, best first: ``encoder/``, then the checkpoints, newest first."""
    export = [] if checkpoints_only or not (run.encoder / "model.safetensors").is_file() else [run.encoder]
    return [*export, *reversed(complete_checkpoints(run.checkpoints))]


def read_folder(path: Path) -> EncoderWeights:
    """The encoder tensors of a run folder, an export or a checkpoint (the objective's other tensors ignored).

    An export or checkpoint named directly is read as it is; a run folder gives the newest readable of its
    export and checkpoints (:func:`read_run`).

    Raises:
        CheckpointError: ``path`` holds no encoder, or nothing in it can be read.
    """
    return read_encoder_folder(path) if folder_kind(path) else read_run(RunFolder(path))


def read_run(run: RunFolder, checkpoints_only: bool = False) -> EncoderWeights:
    """The newest readable encoder of ``run`` (see :func:`run_candidates`); unreadable ones are skipped with a warning.

    Raises:
        CheckpointError: there is no candidate, or none can be read (each one's reason is listed).
    """
    candidates = run_candidates(run, checkpoints_only)
    if not candidates and checkpoints_only:
        raise CheckpointError(f"{run.root} has no complete checkpoint under checkpoints/; is it an sslvit run folder?")
    if not candidates:
        raise CheckpointError(
            f"{run.root} holds no encoder: expected a run folder (encoder/ or checkpoints/step_*), an encoder export "
            "(config.json + model.safetensors) or a checkpoint folder (trainer_state.json)"
        )
    skipped = []
    for folder in candidates:
        try:
            weights = read_encoder_folder(folder)
        except CheckpointError as err:
            skipped.append(f"{folder.relative_to(run.root)}: {err}")
            continue
        for reason in skipped:
            log.warning("skipped unreadable %s; using %s", reason, folder)
        return weights
    raise CheckpointError(f"nothing in {run.root} can be read as an encoder: " + "; ".join(skipped))


def read_encoder_folder(folder: Path) -> EncoderWeights:
    """The encoder tensors of one export (``encoder/``) or checkpoint folder (``checkpoints/step_*``)."""
    kind, run = folder_kind(folder), RunFolder.of(folder)
    file = folder / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors; is it an sslvit training checkpoint?")
    if kind is None:
        raise CheckpointError(f"{folder} has no config.json beside its model.safetensors; re-export the run")
    with reading(file, "a safetensors weights file"):
        tensors, sha = load_file(str(file)), file_sha256(file)
    if kind == "export":
        config = read_json(folder / "config.json", "an encoder export's config", ("architecture",))
        architecture, args = config["architecture"], config.get("model_args", {})
        size = config.get("pretrained_cfg", {}).get("input_size")
        return EncoderWeights(tensors, kind, folder, sha, architecture, args, size, run)
    state = read_json(folder / TRAINER_STATE, "a trainer state", ("encoder_prefix", "architecture", "model_args"))
    prefix = state["encoder_prefix"]
    encoder = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    if not encoder:
        raise CheckpointError(f"{file} holds no tensor under the encoder prefix {prefix!r} its {TRAINER_STATE} names")
    ignored = sorted(k for k in tensors if not k.startswith(prefix))
    architecture, args, size = state["architecture"], state["model_args"], state.get("input_size")
    step = state.get("step")
    return EncoderWeights(encoder, kind, folder, sha, architecture, args, size, run, ignored, step)


def read_json(file: Path, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object file that must hold ``required`` keys; any other content is one error naming the file."""
    with reading(file, what):
        tree = read_trainer_state(file.parent) if file.name == TRAINER_STATE else json.loads(file.read_text())
    missing = [key for key in required if not isinstance(tree, dict) or key not in tree]
    if missing:
        raise CheckpointError(f"{file} is not {what}: it lacks {', '.join(missing)}")
    return tree


def read_file(path: Path, architecture: str | None = None, model_args: dict[str, Any] | None = None) -> EncoderWeights:
    """The encoder tensors of a ``.safetensors``/``.pth`` file, in timm key names (see :func:`convert_state_dict`).

    Without ``architecture``, a standard ViT's is read from the tensors' shapes (:func:`infer_architecture`).
    """
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    state, kind, ignored = convert_state_dict(read_weights(path))
    if not state:
        raise CheckpointError(f"{path} holds no tensors: it is not an encoder's weights file")
    if architecture is None:
        architecture, model_args = infer_architecture(state) or (None, {})
    with reading(path, "a weights file"):
        sha = file_sha256(path)
    return EncoderWeights(state, kind, path, sha, architecture, model_args or {}, ignored=ignored)


def random_init(architecture: str, model_args: dict[str, Any]) -> EncoderWeights:
    """``architecture`` initialised with seed 0: the same encoder every time, so its features can be cached."""
    torch.manual_seed(0)
    state = create_model(architecture, model_args).state_dict()
    return EncoderWeights(state, RANDOM, None, state_sha256(state), architecture, model_args)


def read_weights(path: Path) -> dict[str, Any]:
    """Read a ``.safetensors`` file, or a torch file with ``weights_only=True`` (plus ``argparse.Namespace``).

    Raises:
        CheckpointError: the file is no weights file (text, empty, truncated, another format), or a pickle of more
            than tensors (refused, never unpickled).
    """
    if path.suffix == ".safetensors":
        with reading(path, "a safetensors weights file"):
            return load_file(str(path))
    allowed = torch.serialization.safe_globals([argparse.Namespace])
    with reading(path, "a PyTorch weights file (.pth) or safetensors file"), allowed:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """The one translation of a failed read: any error while reading ``path`` becomes one :class:`CheckpointError`.

    A damaged or foreign file fails deep inside safetensors, pickle, zipfile or json in many ways (``KeyError`` for a
    text file given to ``torch.load``, ``IndexError`` for ``/etc/passwd``, ``SafetensorError`` for an empty file, an
    ``UnpicklingError`` for arbitrary objects): every one is the same user mistake, so all are caught here.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # see the docstring: the failure modes of a foreign file are not enumerable
        raise CheckpointError(f"{path} cannot be read as {what}: {read_failure(path, err)}") from err


def read_failure(path: Path, err: Exception) -> str:
    """What is wrong with a file that failed to read, in one clause (never PyTorch's advice to unpickle it)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if path.is_file() and path.stat().st_size == 0:
        return "the file is empty"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Weights only load failed" in str(err):  # torch's refusal: keep what it refused, drop its advice
        refused = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        refused = refused.removeprefix("WeightsUnpickler error: ").split(". ")[0].rstrip(".")[:160]
        return (
            f"it holds pickled Python objects beyond tensors ({refused}), which torch.load(weights_only=True) refuses; "
            "sslvit never unpickles arbitrary objects: re-save it as a plain state dict or safetensors"
        )
    if path.suffix != ".safetensors" and _head(path) and not _head(path).startswith((b"PK", b"\x80")):
        return "it is neither a PyTorch file (a zip archive or a pickle) nor a safetensors file"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON ({err.msg} at line {err.lineno}); the file is damaged or truncated"
    detail = f" ({type(err).__name__}: {lines[0][:160]})" if lines else f" ({type(err).__name__})"
    return f"it is damaged, truncated or not in this format{detail}"


def _head(path: Path) -> bytes:
    """The first bytes of a file (b"" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(2)
    except OSError:
        return b""


def share_by_umask(files: Iterable[Path]) -> None:
    """Give ``files`` the permissions the umask grants a new file (``0o666 & ~umask``; 0644 under umask 022).

    safetensors writes ``model.safetensors`` through a private temporary file (mode 0600), while ``config.json``
    beside it gets the umask's 0644: on a shared filesystem teammates could read the config but not the weights.
    """
    mask = os.umask(0)
    os.umask(mask)
    for file in files:
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~mask)


def convert_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Pick the encoder's tensors out of an official MAE/DINO (or plain/timm) checkpoint, in timm's key names.

    Returns:
        ``(state_dict, format, ignored)``; format is ``mae``, ``dino-teacher``, ``dino-student``, ``state_dict`` or
        ``plain``; ignored lists the tensors left out (MAE decoder, DINO head, classifier).
    """
    kinds = {"teacher": "dino-teacher", "model": "mae", "state_dict": "state_dict", "student": "dino-student"}
    key = next((k for k in kinds if isinstance(obj.get(k), dict)), None)
    kind = kinds[key] if key else "plain"
    obj = obj[key] if key else obj
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    ignored = []
    if any(k.startswith("backbone.") for k in state):  # DINO: the backbone beside its projection head
        ignored = [k for k in state if not k.startswith("backbone.")]
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    ignored += [k for k in state if k.startswith(DROPPED_PREFIXES)]
    return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}, kind, sorted(ignored)


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """The timm name and arguments of the standard ViT whose shapes ``state`` has, or None for anything else."""
    proj = state.get(PATCH_KERNEL)
    if proj is None or "pos_embed" not in state or proj.shape[0] not in STANDARD_VITS:
        return None
    size, _, heads = STANDARD_VITS[proj.shape[0]]
    patch = int(proj.shape[-1])
    grid = int(round(math.sqrt(state["pos_embed"].shape[1] - 1)))
    args = {"img_size": grid * patch, "patch_size": patch, "depth": vit_depth(state), "num_heads": heads}
    return f"vit_{size}_patch16_224", {**args, "num_classes": 0}


def file_sha256(path: Path) -> str:
    """First 16 hex digits of the sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """First 16 hex digits of the sha256 of a state dict's names and tensor bytes (a random init's identity)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
