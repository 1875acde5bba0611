"""Load any saved encoder for evaluation: an sslvit run, export or checkpoint, or a foreign ``.pth``/``.safetensors``.

``--encoder`` (the ``spec``) may be:

- an sslvit run folder (its ``encoder/`` export, else its newest complete checkpoint),
- an ``encoder/`` export (timm ``local-dir`` layout: config.json + model.safetensors),
- a training checkpoint folder (``checkpoints/step_*``, read through ``trainer_state.json``),
- a timm model name with ``weights`` = a ``.safetensors``/``.pth`` file, or ``"random"`` for a seeded random init
  (the shape comes from the name plus ``model_args``, e.g. ``img_size=32 patch_size=4``),
- a ``.pth``/``.safetensors`` file alone: the ViT shape is read from the weights (standard tiny/small/base/large/huge).

Foreign checkpoints in the official MAE/DINO formats load as they were released. Reading (the one resolver),
building and fitting the weights (position embeddings resampled for another image size) is :mod:`sslvit.weights`,
shared with fine-tuning, continued pretraining and export; this module adds the random baseline, the evaluation
resolution and the identity a report records.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import get_model_traits
from timm.models.vision_transformer import VisionTransformer

from sslvit.backbone import input_size
from sslvit.errors import UserError
from sslvit.weights import EncoderWeights, build_model, resolve


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
    source = resolve(spec, weights, model_args)
    model = source.build(_what(source))
    identity = _identity(source)
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
    architecture, args = identity["architecture"], {**identity["model_args"], "img_size": img_size}
    return build_model(
        architecture, args, model.state_dict(), identity["path"], f"{architecture} at img_size {img_size}"
    )


def _what(source: EncoderWeights) -> str:
    """The source, for messages: ``mae_pretrain_vit_base.pth (mae format)``, a folder, or the random init."""
    if source.path is None:
        return f"{source.architecture} (random init, seed 0)"
    return f"{source.path} ({source.kind} format)" if source.path.is_file() else str(source.path)


def _identity(source: EncoderWeights) -> dict[str, Any]:
    """What a report records about the encoder (JSON-friendly)."""
    return {
        "path": str(source.path.resolve()) if source.path else _what(source),
        "sha256": source.sha256,
        "kind": source.kind,
        "architecture": source.architecture,
        "model_args": _plain(source.model_args),
        "run_dir": str(source.run.root.resolve()) if source.run else None,
    }


def _plain(args: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly model arguments: tuples become lists, ``img_size=[32, 32]`` becomes 32."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    if isinstance(out.get("img_size"), list) and len(set(out["img_size"])) == 1:
        out["img_size"] = out["img_size"][0]
    return out
