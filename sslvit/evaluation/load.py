"""Load any saved encoder for evaluation: an sslvit run, export or checkpoint, or a foreign ``.pth``/``.safetensors``.

``--encoder`` (the ``spec``) may be:

- an sslvit run folder (its ``encoder/`` export, else its newest complete checkpoint),
- an ``encoder/`` export (timm ``local-dir`` layout: config.json + model.safetensors),
- a training checkpoint folder (``checkpoints/step_*``, read through ``trainer_state.json``),
- a timm model name with ``weights`` = a ``.safetensors``/``.pth`` file, or ``"random"`` for a seeded random init
  (the shape comes from the name plus ``model_args``, e.g. ``img_size=32 patch_size=4``),
- a ``.pth``/``.safetensors`` file alone: the ViT shape is read from the weights (standard tiny/small/base/large/huge).

Foreign checkpoints in the official MAE/DINO formats load as they were released. Reading, converting and fitting
the weights (position embeddings resampled for another image size) is :mod:`sslvit.weights`, shared with
fine-tuning and continued pretraining; files are read with safetensors or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_model_traits
from timm.models.vision_transformer import VisionTransformer

from sslvit.backbone import input_size
from sslvit.checkpoint import encoder_from_checkpoint, load_exported_encoder, read_trainer_state
from sslvit.errors import CheckpointError, UserError
from sslvit.weights import file_sha256, fit_state_dict, locate_folder, read_file, state_sha256

__all__ = ["load_encoder", "state_sha256"]

RANDOM = "random"
# embed_dim -> (size name, depth, num_heads) of the standard ViTs, for reading the shape of a bare weights file
STANDARD_VITS = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
                 1280: ("huge", 32, 16)}  # fmt: skip


def load_encoder(
    spec: str, weights: str | None = None, img_size: int | None = None, model_args: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
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
    identity["pretrain_img_size"] = input_size(model)  # any timm model: a ViT, or e.g. a DINO-trained CNN
    if img_size is not None and img_size != identity["pretrain_img_size"]:
        model = _at_resolution(model, identity, img_size)
    identity["img_size"] = input_size(model) if img_size is None else img_size
    if get_model_traits(model).get("img_size") is not None:  # a CNN takes no img_size argument
        identity["model_args"] = {**identity["model_args"], "img_size": identity["img_size"]}
    return model.eval(), identity


def _at_resolution(model: VisionTransformer, identity: dict[str, Any], img_size: int) -> VisionTransformer:
    """The same architecture built for ``img_size``, its weights fitted by :func:`sslvit.weights.fit_state_dict`.

    That is the one resampling shared with fine-tuning and continued pretraining (``pos_embed`` in 2-D, bicubic).
    A model without an ``img_size`` argument (a CNN) takes any size as it is.
    """
    traits = get_model_traits(model)
    if traits.get("fixed_input_size") and getattr(model, "pos_embed", None) is None:  # timm marks ViTs fixed too
        size = identity["pretrain_img_size"]
        raise UserError(f"{identity['architecture']} takes only {size} px images: drop --img-size")
    if traits.get("img_size") is None:
        return model
    patch = int(model.patch_embed.patch_size[0])
    if img_size % patch:
        raise UserError(f"--img-size {img_size} is not a multiple of the encoder's patch size {patch}")
    resized = _create(identity["architecture"], {**identity["model_args"], "img_size": img_size})
    fit_state_dict(resized, model.state_dict(), identity["path"], f"{identity['architecture']} at img_size {img_size}")
    return resized


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
    """A run folder, an ``encoder/`` export or a training checkpoint (found by :func:`sslvit.weights.locate_folder`)."""
    folder, kind, run_dir = locate_folder(path)
    if kind == "export":
        config = json.loads((folder / "config.json").read_text())
        architecture, args, model = config["architecture"], config.get("model_args", {}), load_exported_encoder(folder)
    else:
        state = read_trainer_state(folder)
        architecture, args, model = state["architecture"], state["model_args"], encoder_from_checkpoint(folder)
    return model, _identity(folder, file_sha256(folder / "model.safetensors"), kind, architecture, args, run_dir)


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
    weights = read_file(path)
    if name is None:
        name, args = infer_architecture(weights.state, path)
    model = _create(name, {**args, "num_classes": 0})
    fit_state_dict(model, weights.state, f"{path} ({weights.kind} format)", f"{name} {args}")
    return model, _identity(path, weights.sha256, weights.kind, name, {**args, "num_classes": 0}, None)


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


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly model arguments: tuples become lists, ``img_size=[32, 32]`` becomes 32."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    if isinstance(out.get("img_size"), list) and len(set(out["img_size"])) == 1:
        out["img_size"] = out["img_size"][0]
    return out
