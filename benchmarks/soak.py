"""Soak: many tiny pretraining steps with frequent checkpoints; resident memory must not grow with steps.

Prints one JSON object: steps, checkpoints written, resident set size (MiB) after warm-up and at the end, and
the growth per 1000 steps. Not a unit test: run it by hand (the command below), about 2 minutes on 2 CPU cores.

    python benchmarks/soak.py --steps 2000 --checkpoint-every 100
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import psutil
from accelerate import Accelerator

from sslvit.recipe import apply_overrides, load_recipe
from sslvit.train import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    process, samples = psutil.Process(), []
    original = Accelerator.save_state

    def save_state(self, *a, **kw):  # sample memory at each checkpoint: steps are its clock
        result = original(self, *a, **kw)
        samples.append(process.memory_info().rss / 2**20)
        return result

    Accelerator.save_state = save_state
    recipe = apply_overrides(
        load_recipe("quickstart"),
        [
            "model.depth=2",
            "model.embed_dim=64",
            "model.num_heads=2",
            "objective.decoder_depth=1",
            "train.global_batch_size=16",
            "train.batch_size_per_device=16",
            f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.checkpoint_every}",
            "log.every=50",
            "log.image_every=500",
            "data.num_workers=2",
        ],
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        summary = pretrain(recipe, Path(run))
    warm = samples[min(2, len(samples) - 1)]  # after the first checkpoints: allocator and caches settled
    growth = (samples[-1] - warm) / max(args.steps - 3 * args.checkpoint_every, 1) * 1000
    print(
        json.dumps(
            {
                "benchmark": "soak",
                "steps": summary["steps"],
                "checkpoints": len(samples),
                "rss_mib_after_warmup": round(warm, 1),
                "rss_mib_end": round(samples[-1], 1),
                "rss_mib_max": round(max(samples), 1),
                "growth_mib_per_1000_steps": round(growth, 2),
                "wall_s": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
