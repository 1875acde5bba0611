"""Per-sample seeding: an augmentation drawn from an RNG keyed by (seed, epoch, sample index)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded_rng(*key: int, restore: bool = True) -> Iterator[None]:
    """Run the block with torch (CPU), numpy and python RNGs seeded from ``key``, then restore them.

    Augmentations drawn this way depend only on (seed, epoch, sample index): not on which worker decodes the
    sample, nor on batches skipped when a run resumes mid-epoch, nor on the main process's RNG (masking).
    ``restore=False`` leaves the three RNGs seeded: for a DataLoader worker, which draws from them nothing but
    the augmentations that reseed them first (saving and restoring numpy's state alone costs ~0.13 ms a sample).
    """
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
