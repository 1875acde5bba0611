"""Shared fixtures: tiny recipes that train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from sslvit.recipe import Recipe, apply_overrides, load_recipe

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

TINY_MODEL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.img_size=32", "model.patch_size=4"]


def flags(**options: Any) -> list[str]:
    """Command-line flags: ``flags(limit_train=200, k=[10, 20], no_cache=True)`` ->
    ``["--limit-train", "200", "--k", "10", "20", "--no-cache"]``."""
    out = []
    for key, value in options.items():
        out.append("--" + key.replace("_", "-"))
        if value is not True:
            out += [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
    return out


# A tiny run: 32 px digits, 16 images per step, 2 steps, everything logged.
TINY_RUN = [
    *TINY_MODEL,
    "data.path=digits",
    "data.num_workers=0",
    "train.global_batch_size=16",
    "train.batch_size_per_device=16",
    "train.precision=no",
    "train.max_steps=2",
    "log.every=1",
    "log.image_every=1",
    "log.num_images=2",
]


def tiny_recipe(name: str = "quickstart", *overrides: str) -> Recipe:
    """A shipped recipe shrunk to a depth-2, width-64 ViT on 32 px digits, 16 images per step."""
    base = list(TINY_RUN)
    if name == "quickstart":
        base += ["objective.decoder_embed_dim=32", "objective.decoder_depth=1", "objective.decoder_num_heads=2"]
    recipe = apply_overrides(load_recipe(name), [*base, *overrides])
    recipe.validate()
    return recipe


@pytest.fixture
def one_thread():
    """Tiny tensors: on a busy CPU, waiting for a second thread costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory) -> Path:
    """A finished tiny MAE run on 32 px digits (depth 2, width 64, patch 4): export + one checkpoint. Read only."""
    from sslvit.train import pretrain  # imported when a test asks for a run, not for every test

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("mae") / "run"
    pretrain(tiny_recipe("quickstart", "train.max_steps=1", "train.checkpoint_every=1", "log.image_every=0"), run)
    torch.set_num_threads(threads)
    return run


@pytest.fixture
def cifar10() -> Path:
    if not SHARED_CIFAR10.is_dir():
        pytest.skip("the shared CIFAR-10 copy (../shared/data/cifar10) is not present")
    return SHARED_CIFAR10


def crops_batch(objective: torch.nn.Module, n: int = 4) -> dict:
    """A collated batch of ``objective.views()`` of ``n`` random 40x36 images (seeded)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]
    return {"views": default_collate([objective.views()(im) for im in images])}
