"""The one builder: a timm model made by its name and loaded through :func:`fit_state_dict`.

Evaluation (``--encoder``, ``--img-size``), fine-tuning (the classifier built from an encoder), continued
pretraining (``model.init``) and export all load weights through :func:`fit_state_dict`, so a change of image or
patch size is handled the same way everywhere: ``pos_embed`` is resampled in 2-D by :func:`resample_pos_embed`
(timm's ``resample_abs_pos_embed``: bicubic, antialiased, the class/register token positions kept as they are) and
the patch-embedding kernel by timm's ``resample_patch_embed`` (FlexiViT's pseudo-inverse resize).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from sslvit.errors import CheckpointError

PATCH_KERNEL = "patch_embed.proj.weight"


@dataclass
class Fit:
    """What :func:`fit_state_dict` did."""

    loaded: int  # tensors of the model loaded from the state
    resampled: list[str]  # e.g. "pos_embed 1x65x64 -> 1x145x64 (8x8 -> 12x12 patches)"
    new: list[str]  # keys of the model left as initialised (allowed by ``new_ok``)
    ignored: list[str]  # keys of the state not used (allowed by ``ignore_ok``)


def create_model(architecture: str, model_args: dict[str, Any], input_size: Sequence[int] | None = None):
    """``timm.create_model(architecture, **model_args)``, randomly initialised, at the recorded ``input_size``.

    ``input_size`` is a CNN's training resolution, which no ``model_args`` hold: it goes into the model's
    ``pretrained_cfg`` so that timm's data config (and :func:`sslvit.backbone.input_size`) report it.

    Raises:
        CheckpointError: timm cannot build ``architecture`` with these arguments.
    """
    overlay = {"input_size": tuple(input_size)} if input_size else None
    try:
        return timm.create_model(architecture, pretrained=False, pretrained_cfg_overlay=overlay, **model_args)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as e:
        # the arguments come from a file (an export's config.json, a trainer_state.json): wrong ones fail in timm
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"timm cannot build {architecture} with {model_args}: {first}") from e


def build_model(
    architecture: str,
    model_args: dict[str, Any],
    state: dict[str, torch.Tensor],
    what: str,
    target: str | None = None,
    input_size: Sequence[int] | None = None,
    new_ok: tuple[str, ...] = (),
    ignore_ok: tuple[str, ...] = (),
) -> torch.nn.Module:
    """Build ``architecture`` with timm and load ``state`` into it through :func:`fit_state_dict`.

    Args:
        architecture: the timm name.
        model_args: ``timm.create_model`` arguments (a new ``img_size`` resamples ``pos_embed``).
        state: tensors in the model's key names.
        what: the source, for messages.
        target: the model, for messages (default: the architecture and its arguments).
        input_size: the recorded training resolution, see :func:`create_model`.
        new_ok: key prefixes of the model that may stay as initialised (a classifier head).
        ignore_ok: key prefixes of ``state`` that may go unused.

    Raises:
        CheckpointError: timm cannot build it, or the weights do not fit it (see :func:`fit_state_dict`).
    """
    model = create_model(architecture, model_args, input_size)
    fit_state_dict(model, state, what, target or f"{architecture} {model_args}", new_ok, ignore_ok)
    return model


def fit_state_dict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    target: str,
    new_ok: tuple[str, ...] = (),
    ignore_ok: tuple[str, ...] = (),
) -> Fit:
    """Load ``state`` into ``model``, resampling ``pos_embed`` and the patch kernel first when only their grid differs.

    Args:
        model: the model, already built at its target image and patch size.
        state: tensors in the model's key names.
        what: the source, for messages (``runs/a/encoder``).
        target: the model, for messages (``vit_base_patch16_224 at img_size 384``).
        new_ok: key prefixes of the model that may stay as initialised (a classifier head).
        ignore_ok: key prefixes of ``state`` that may go unused.

    Raises:
        CheckpointError: one message listing every other missing key, unexpected key and shape mismatch.
    """
    own = model.state_dict()
    try:
        state, resampled = _resample(model, own, state)
    except (RuntimeError, ValueError) as e:  # e.g. a pos_embed of one position: nothing to interpolate from
        shapes = {k: tuple(state[k].shape) for k in ("pos_embed", PATCH_KERNEL) if k in state}
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{what}: cannot resample {shapes} to fit {target} ({first})") from e
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad_missing = [k for k in missing if not k.startswith(new_ok)]
    bad_unexpected = [k for k in unexpected if not k.startswith(ignore_ok)]
    common = sorted(set(own) & set(state))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in common if state[k].shape != own[k].shape
    ]
    if bad_missing or bad_unexpected or shapes:
        raise CheckpointError(
            f"{what}{shape_hint(state)} does not fit {target}: {_listing('missing keys', bad_missing)}; "
            f"{_listing('unexpected keys', bad_unexpected)}; {_listing('shape mismatches (file vs model)', shapes)}"
        )
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except RuntimeError as e:  # shapes were checked above; what remains is e.g. a dtype that cannot be copied
        raise CheckpointError(f"{what} does not load into {target}: {str(e).strip()[:200]}") from e
    return Fit(loaded=len(own) - len(missing), resampled=resampled, new=missing, ignored=unexpected)


def resample_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int) -> torch.Tensor:
    """Resample ``pos_embed: (1, prefix + h * w, D)`` from its square grid to ``grid`` in 2-D.

    Wraps timm's ``resample_abs_pos_embed`` (bicubic, antialiased; the ``num_prefix_tokens`` class/register
    positions are kept) so that every caller reads the source grid the same way (square) and fails the same way.

    Raises:
        CheckpointError: the source positions do not form a square grid.
    """
    positions = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(max(positions, 0))
    if side * side != positions:
        raise CheckpointError(f"pos_embed has {positions} patch positions, not a square grid: cannot resample it")
    return resample_abs_pos_embed(pos_embed, list(grid), [side, side], num_prefix_tokens=num_prefix_tokens)


def _resample(model: torch.nn.Module, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]):
    """``state`` with the patch kernel and ``pos_embed`` resampled to ``model``'s grid -> (state, what changed)."""
    notes = []
    kernel, own_kernel = state.get(PATCH_KERNEL), own.get(PATCH_KERNEL)
    same_channels = kernel is not None and own_kernel is not None and kernel.shape[:2] == own_kernel.shape[:2]
    if same_channels and kernel.ndim == own_kernel.ndim == 4 and kernel.shape[2:] != own_kernel.shape[2:]:
        new = resample_patch_embed(kernel, list(own_kernel.shape[2:]))
        state = {**state, PATCH_KERNEL: new}
        notes.append(f"{PATCH_KERNEL} {_dims(kernel)} -> {_dims(new)}")
    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape[-1] == own_pos.shape[-1] and pos.shape != own_pos.shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        grid = list(model.patch_embed.grid_size)
        new = resample_pos_embed(pos, grid, prefix)
        side = math.isqrt(pos.shape[1] - prefix)
        state = {**state, "pos_embed": new}
        notes.append(f"pos_embed {_dims(pos)} -> {_dims(new)} ({side}x{side} -> {grid[0]}x{grid[1]} patches)")
    return state, notes


def vit_depth(state: dict[str, torch.Tensor]) -> int:
    """The number of transformer blocks (``blocks.N.*``) in a ViT state dict."""
    return len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})


def shape_hint(state: dict[str, torch.Tensor]) -> str:
    """`` (depth 4, embed_dim 128, patch 4)`` read from a ViT state dict, or ``""``."""
    proj = state.get(PATCH_KERNEL)
    if proj is None or proj.ndim != 4:
        return ""
    return f" (depth {vit_depth(state)}, embed_dim {proj.shape[0]}, patch {proj.shape[-1]})"


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape))


def _listing(title: str, items: list[str], show: int = 10) -> str:
    more = f" and {len(items) - show} more" if len(items) > show else ""
    return f"{len(items)} {title}" + (f" [{', '.join(items[:show])}{more}]" if items else "")
