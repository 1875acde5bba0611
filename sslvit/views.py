"""Image transforms shared by objectives, evaluation and visualisation.

Each objective builds its own training views in its own file (from lightly's transforms); this module holds
only what several of them share: the normalisation, the evaluation transform and its inverse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

IMAGENET_NORMALIZE = {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Callable:
    """Resize the short side to ``img_size / crop_pct`` (bicubic), centre-crop ``img_size``, normalise."""
    return T.Compose(
        [
            T.Resize(round(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(**IMAGENET_NORMALIZE),
        ]
    )


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: ``(N, 3, H, W)`` normalised -> ``[0, 1]`` for display."""
    mean = images.new_tensor(IMAGENET_NORMALIZE["mean"]).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_NORMALIZE["std"]).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0.0, 1.0)
