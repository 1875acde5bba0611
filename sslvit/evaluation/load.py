"""Load any saved encoder for evaluation: an sslvit run, export or checkpoint, or a foreign ``.pth``/``.safetensors``.

``--encoder`` (the ``spec``) may be:

- an sslvit run folder (its ``encoder/`` export, else its newest complete checkpoint),
- an ``encoder/`` export (timm ``local-dir`` layout: config.json + model.safetensors),
- a training checkpoint folder (``checkpoints/step_*``, read through ``trainer_state.json``),
- a timm model name with ``weights`` = a ``.safetensors``/``.pth`` file, or ``"random"`` for a seeded random init
  (the shape comes from the name plus ``model_args``, e.g. ``img_size=32 patch_size=4``),
- a ``.pth``/``.safetensors`` file alone: the ViT shape is read from the weights (standard tiny/small/base/large/huge).

Foreign checkpoints in the official formats load as they were released: facebookresearch/mae (``{'model': ...}``,
``decoder_*`` and ``mask_token`` dropped) and facebookresearch/dino (``teacher``/``student`` dicts with
``backbone.``/``module.backbone.`` prefixes, or a plain backbone state dict). Files are read with
``torch.load(weights_only=True)`` (only ``argparse.Namespace``, which both repos store as ``args``, is allowed
beyond tensors) or safetensors: nothing else is ever unpickled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from sslvit.checkpoint import (
    TRAINER_STATE,
    encoder_from_checkpoint,
    latest_checkpoint,
    load_exported_encoder,
    read_trainer_state,
)
from sslvit.errors import CheckpointError, UserError

RANDOM = "random"
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
DROPPED_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")  # MAE decoder, DINO projection head, classifiers
# embed_dim -> (size name, depth, num_heads) of the standard ViTs, for reading the shape of a bare weights file
STANDARD_VITS = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
                 1280: ("huge", 32, 16)}  # fmt: skip


def load_encoder(
    spec: str, weights: str | None = None, img_size: int | None = None, model_args: dict[str, Any] | None = None
) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load an encoder (eval mode, ``num_classes=0``) and say exactly what was loaded.

    Args:
        spec: run folder, ``encoder/`` export, checkpoint folder, timm model name or weights file (see module doc).
        weights: with a timm model name: a weights file, or ``"random"`` for a random init (seed 0).
        img_size: evaluation resolution; position embeddings are resampled in 2-D when it differs from the
            pretraining resolution. None keeps the encoder's own.
        model_args: extra ``timm.create_model`` arguments, only with a timm model name (e.g. ``patch_size=4``).

    Returns:
        ``(encoder, identity)``; identity holds ``path``, ``sha256`` (first 16 hex digits of the weights' hash),
        ``kind``, ``architecture``, ``model_args`` (at the evaluation resolution), ``img_size``,
        ``pretrain_img_size`` and ``run_dir`` (the run folder the encoder lives in, or None).

    Raises:
        CheckpointError: the spec names nothing loadable, or the weights do not fit the architecture.
    """
    path = Path(spec).expanduser()
    if (model_args or weights) and (path.is_dir() or path.is_file()):
        raise CheckpointError(f"--weights and --model-args go with a timm model name, not with {spec}")
    if path.is_dir():
        model, identity = _load_folder(path)
    elif path.is_file():
        model, identity = _load_weights_file(path, None, {})
    elif spec in timm.list_models():
        model, identity = _load_timm_name(spec, weights, model_args or {})
    else:
        raise CheckpointError(
            f"--encoder {spec} is not a run folder, an encoder/ export, a checkpoint folder, a weights file or a "
            "timm model name (e.g. --encoder vit_base_patch16_224 --weights mae_pretrain_vit_base.pth)"
        )
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"{spec} is a {type(model).__name__}; evaluation needs a timm VisionTransformer")
    identity["pretrain_img_size"] = int(model.patch_embed.img_size[0])
    if img_size is not None and img_size != identity["pretrain_img_size"]:
        _set_resolution(model, img_size)
    identity["img_size"] = int(model.patch_embed.img_size[0])
    identity["model_args"] = {**identity["model_args"], "img_size": identity["img_size"]}
    return model.eval(), identity


def _set_resolution(model: VisionTransformer, img_size: int) -> None:
    """Resample the position embeddings in 2-D (timm's ``resample_abs_pos_embed``, bicubic) to ``img_size``."""
    patch = int(model.patch_embed.patch_size[0])
    if img_size % patch:
        raise UserError(f"--img-size {img_size} is not a multiple of the encoder's patch size {patch}")
    model.set_input_size(img_size=(img_size, img_size))


def _identity(path: Path | str, sha: str, kind: str, architecture: str, args: dict[str, Any], run_dir: Path | None):
    return {
        "path": str(path.resolve()) if isinstance(path, Path) else path,
        "sha256": sha,
        "kind": kind,
        "architecture": architecture,
        "model_args": _plain(args),
        "run_dir": str(run_dir.resolve()) if run_dir else None,
    }


def _load_folder(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A run folder, an ``encoder/`` export or a training checkpoint."""
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file() and not _is_checkpoint(path):
        config = json.loads((path / "config.json").read_text())
        run_dir = path.parent if _is_run(path.parent) else None
        model = load_exported_encoder(path)
        ident = _identity(path, file_sha256(path / "model.safetensors"), "export", config["architecture"],
                          config.get("model_args", {}), run_dir)  # fmt: skip
        return model, ident
    if _is_checkpoint(path):
        state = read_trainer_state(path)
        run_dir = path.parents[1] if path.parent.name == "checkpoints" else None
        model = encoder_from_checkpoint(path)
        sha = file_sha256(path / "model.safetensors")
        return model, _identity(path, sha, "checkpoint", state["architecture"], state["model_args"], run_dir)
    if (path / "encoder" / "model.safetensors").is_file():
        return _load_folder(path / "encoder")
    checkpoint = latest_checkpoint(path / "checkpoints")
    if checkpoint is not None:
        return _load_folder(checkpoint)
    raise CheckpointError(
        f"{path} holds no encoder: expected a run folder (encoder/ or checkpoints/step_*), an encoder export "
        "(config.json + model.safetensors) or a checkpoint folder (trainer_state.json)"
    )


def _is_run(path: Path) -> bool:
    """An sslvit run folder: the resolved recipe (config.json) or checkpoints/ beside the export."""
    return path.name != "" and ((path / "checkpoints").is_dir() or (path / "config.json").is_file())


def _is_checkpoint(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file()


def _load_timm_name(name: str, weights: str | None, args: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    if weights is None:
        raise CheckpointError(f"--encoder {name} is a timm model name: add --weights FILE (or --weights random)")
    args = {**args, "num_classes": 0}
    if weights == RANDOM:
        torch.manual_seed(0)  # the same random encoder every time, so its features can be cached and compared
        model = _create(name, args)
        return model, _identity(f"{name} (random init, seed 0)", state_sha256(model.state_dict()), RANDOM, name, args,
                                None)  # fmt: skip
    return _load_weights_file(Path(weights).expanduser(), name, args)


def _create(name: str, args: dict[str, Any]) -> torch.nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **args)
    except TypeError as e:
        raise CheckpointError(f"timm cannot build {name} with {args}: {e}") from e


def _load_weights_file(path: Path, name: str | None, args: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A foreign weights file, into ``name`` (or into the standard ViT its shapes describe)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    state, kind = convert_state_dict(read_weights(path))
    if name is None:
        name, args = infer_architecture(state, path)
    model = _create(name, {**args, "num_classes": 0})
    fit_state_dict(model, state, f"{path} ({kind} format)", f"{name} {args}")
    return model, _identity(path, file_sha256(path), kind, name, {**args, "num_classes": 0}, None)


def read_weights(path: Path) -> dict[str, Any]:
    """Read a ``.safetensors`` file, or a torch file with ``weights_only=True`` (plus ``argparse.Namespace``)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} cannot be read as plain tensors with torch.load(weights_only=True) ({first}); sslvit never "
            "unpickles arbitrary objects: re-save it as a state dict or safetensors"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def convert_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the encoder's tensors out of an official MAE/DINO (or plain/timm) checkpoint, in timm's key names.

    Returns:
        ``(state_dict, format)``; format is ``mae``, ``dino-teacher``, ``dino-student``, ``state_dict`` or ``plain``.
    """
    kinds = {"teacher": "dino-teacher", "model": "mae", "state_dict": "state_dict", "student": "dino-student"}
    key = next((k for k in kinds if isinstance(obj.get(k), dict)), None)
    kind = kinds[key] if key else "plain"
    obj = obj[key] if key else obj
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in state):  # DINO: the backbone beside its projection head
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}, kind


def infer_architecture(state: dict[str, torch.Tensor], path: Path) -> tuple[str, dict[str, Any]]:
    """The timm name and arguments of the standard ViT whose shapes ``state`` has."""
    proj = state.get("patch_embed.proj.weight")
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if proj is None or "pos_embed" not in state or proj.shape[0] not in STANDARD_VITS:
        raise CheckpointError(
            f"cannot tell the ViT shape of {path}; give its timm model name: --encoder NAME --weights {path}"
        )
    size, _, heads = STANDARD_VITS[proj.shape[0]]
    patch = int(proj.shape[-1])
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    args = {"img_size": grid * patch, "patch_size": patch, "depth": depth, "num_heads": heads}
    return f"vit_{size}_patch16_224", args


def fit_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, target: str) -> None:
    """Load ``state`` strictly, resampling ``pos_embed`` in 2-D first when only its grid differs.

    Raises:
        CheckpointError: one message listing every missing key, unexpected key and shape mismatch.
    """
    own = model.state_dict()
    pos, target_pos = state.get("pos_embed"), own.get("pos_embed")
    same_width = pos is not None and target_pos is not None and pos.shape[-1] == target_pos.shape[-1]
    if same_width and pos.shape[1] != target_pos.shape[1]:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old = int(round((pos.shape[1] - prefix) ** 0.5))
        new = list(model.patch_embed.grid_size)
        state = {**state, "pos_embed": resample_abs_pos_embed(pos, new, [old, old], num_prefix_tokens=prefix)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{what}{_shape_hint(state)} does not fit {target}: {_listing('missing keys', missing)}; "
            f"{_listing('unexpected keys', unexpected)}; {_listing('shape mismatches (file vs model)', shapes)}"
        )
    model.load_state_dict(state, strict=True)


def _shape_hint(state: dict[str, torch.Tensor]) -> str:
    """`` (depth 4, embed_dim 128, patch 4)`` read from a ViT state dict, or ``""``."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return ""
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    return f" (depth {depth}, embed_dim {proj.shape[0]}, patch {proj.shape[-1]})"


def _listing(title: str, items: list[str], show: int = 10) -> str:
    more = f" and {len(items) - show} more" if len(items) > show else ""
    return f"{len(items)} {title}" + (f" [{', '.join(items[:show])}{more}]" if items else "")


def file_sha256(path: Path) -> str:
    """First 16 hex digits of the sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """First 16 hex digits of the sha256 of a state dict's names and tensor bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly model arguments: tuples become lists, ``img_size=[32, 32]`` becomes 32."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    if isinstance(out.get("img_size"), list) and len(set(out["img_size"])) == 1:
        out["img_size"] = out["img_size"][0]
    return out


def run_dir_of(identity: dict[str, Any]) -> Path | None:
    """The run folder an encoder was loaded from, or None."""
    return Path(identity["run_dir"]) if identity.get("run_dir") else None
