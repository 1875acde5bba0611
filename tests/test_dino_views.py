"""DINO's multi-crop augmentation options: official probabilities by default, each one honoured when changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslvit.backbone import build_vit
from sslvit.errors import RecipeError
from sslvit.objectives import DINO, DINOConfig
from sslvit.recipe import ModelConfig

TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1, embed_dim=32, num_heads=2)
SMALL_HEAD = {"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8, "local_crop_size": 16, "local_crops_number": 2}


def views_of(cfg: DINOConfig, image: Image.Image, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return DINO(build_vit(TINY, **DINO.backbone_kwargs(cfg)), cfg).views()(image)


def an_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_the_default_probabilities_are_the_official_dataaugmentationdino():
    cfg = DINOConfig()  # facebookresearch/dino main_dino.py DataAugmentationDINO
    assert (cfg.hflip_prob, cfg.color_jitter_prob, cfg.gray_scale_prob) == (0.5, 0.8, 0.2)
    assert (cfg.blur_probs, cfg.solarization_prob) == ((1.0, 0.1, 0.5), 0.2)


def test_with_every_random_piece_off_the_global_views_are_the_whole_image_unchanged():
    off = DINOConfig(**SMALL_HEAD, hflip_prob=0.0, color_jitter_prob=0.0, gray_scale_prob=0.0,
                     blur_probs=(0.0, 0.0, 0.0), solarization_prob=0.0, global_crops_scale=(1.0, 1.0))  # fmt: skip
    image = an_image()
    for seed in range(3):
        first, second, *local = views_of(off, image, seed)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        assert len(local) == 2 and local[0].shape == (3, 16, 16)
    flipped = views_of(DINOConfig(**{**off.__dict__, "hflip_prob": 1.0}), image, 0)
    torch.testing.assert_close(flipped[0], views_of(off, image, 0)[0].flip(-1), rtol=0, atol=0)


def test_the_official_pieces_change_the_global_views():
    official = DINOConfig(**SMALL_HEAD, global_crops_scale=(1.0, 1.0))  # only the photometric pieces and the flip
    first, second, *_ = views_of(official, an_image(), 0)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("field, value", [("hflip_prob", 1.5), ("solarization_prob", -0.1),
                                          ("blur_probs", (1.0, 0.1, 2.0))])  # fmt: skip
def test_a_probability_outside_zero_one_is_refused(field, value):
    with pytest.raises(RecipeError, match=field):
        DINOConfig(**{field: value}).validate()
