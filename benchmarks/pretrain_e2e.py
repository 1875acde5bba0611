"""End-to-end pretraining throughput: the real loop against its bare step and against its loader alone.

For each case it prints one JSON object with three measurements made in one process on one device:

- ``e2e``: :func:`sslvit.train.pretrain` on real data (decode, augmentation, loader workers as the recipe has
  them, logging, the EMA teacher, checkpointing) for ``warmup + steps + 1`` steps. Only the steady state is
  timed: the start of every optimisation step is time-stamped (through the loop's ``LoopCallback``), and
  the ``steps`` iterations after the first ``warmup`` are timed, so start-up, worker spawn and the final export
  are left out. Costs that come once per N steps are measured where they happen (the final checkpoint, the image
  log at the last step) and added per step at the recipe's own interval (``train.checkpoint_every``,
  ``log.image_every``, ``eval.knn_every``), so ``e2e_images_per_s`` is what a long run sustains.
- ``bare``: the same step on synthetic tensors, as ``benchmarks/throughput.py`` times it (``sslvit_step``: the
  loop's own schedules, forward/backward, clipping, optimizer and ``after_step``), in windows half before and half
  after the e2e run; the median is reported.
- ``loader``: the same DataLoader (same dataset, transforms, workers, batch) iterated with no model.

``e2e_over_bare`` is what the loop costs around the step (target >= 0.9); ``loader_over_bare`` says how far the
loader alone is ahead of the step (below 1, the loader is the bottleneck). On a shared machine wall-clock ratios
are noisy, so CPU time is reported too: ``e2e_cpu_ms_per_image`` (training process + loader workers, over the
timed steps), ``loader_workers_cpu_ms_per_image`` and ``bare_cpu_ms_per_image``; on a quiet machine whose cores
the step keeps busy, ``1 / e2e_cpu_over_bare_cpu`` is about what ``e2e_over_bare`` can reach.

    python benchmarks/pretrain_e2e.py --suite cpu                      # CIFAR-10 config, about 3 minutes
    python benchmarks/pretrain_e2e.py --suite gpu                      # mae_vit_b / dino_vit_s16 from JPEGs
    python benchmarks/pretrain_e2e.py --recipe mae_vit_tiny_cifar --batch 64 --steps 40 --set data.num_workers=1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import torch
from PIL import Image
from throughput import TOTAL_STEPS, Config, sslvit_step  # benchmarks/throughput.py: the bare step, shared

import sslvit.train as train_module
from sslvit import data
from sslvit.recipe import Recipe, apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
# Tiny shapes for --smoke: the script's plumbing in seconds, on any machine (numbers meaningless).
SMOKE = [
    "model.depth=2",
    "model.embed_dim=64",
    "model.num_heads=2",
    "model.img_size=32",
    "model.patch_size=4",
    "log.num_images=2",
]
SMOKE_OBJECTIVE = {
    "mae": ["objective.decoder_embed_dim=32", "objective.decoder_depth=1", "objective.decoder_num_heads=2"],
    "dino": ["objective.out_dim=256", "objective.hidden_dim=64", "objective.bottleneck_dim=32",
             "objective.global_crop_size=32", "objective.local_crop_size=16", "objective.local_crops_number=2"],
}  # fmt: skip


@dataclass
class Case:
    """One measurement: a recipe at a per-device batch, ``warmup`` untimed then ``steps`` timed steps."""

    recipe: str
    batch: int
    warmup: int
    steps: int
    overrides: list[str] = field(default_factory=list)


# CPU: the CIFAR config (vit_tiny, 32 px, patch 4; DINO 2 x 32 + 6 x 16 px, out_dim 4096). DINO runs at
# ~10-20 images/s on 2 cores, so it uses batch 16 (a harsher test: the per-step loop costs weigh 4x more).
SUITES = {
    "cpu": [
        Case("mae_vit_tiny_cifar", 64, warmup=10, steps=40),
        Case("dino_vit_tiny_cifar", 16, warmup=4, steps=12, overrides=["objective.local_crops_number=6"]),
    ],
    "gpu": [
        Case("mae_vit_b", 64, warmup=20, steps=100, overrides=["train.precision=bf16"]),
        Case("dino_vit_s16", 64, warmup=10, steps=50,
             overrides=["train.precision=bf16", "objective.local_crops_number=10"]),
    ],
}  # fmt: skip


BARE_WINDOWS = 4  # half before the e2e run, half after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), help="the benchmark set (default: one --recipe case)")
    parser.add_argument("--recipe", default="mae_vit_tiny_cifar", help="recipe name or file (without --suite)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (without --suite)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (without --suite)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (without --suite)")
    parser.add_argument("--data", help="data.path (default: ../shared/data/cifar10; gpu suite: generated JPEGs)")
    parser.add_argument("--precision", choices=["no", "bf16", "fp16"], help="train.precision (default: recipe's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    parser.add_argument("--threads", type=int, help="torch threads of the training process (default: torch's)")
    parser.add_argument("--augment-on", nargs="+", default=["auto"], choices=["auto", "worker", "device"],
                        help="data.augment_on values to measure, each case once per value")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks the script runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = SUITES[args.suite] if args.suite else [Case(args.recipe, args.batch, args.warmup, args.steps)]
    with tempfile.TemporaryDirectory(prefix="sslvit_e2e_") as tmp:
        data_path = args.data or _default_data(args.suite, Path(tmp), args.smoke)
        for case in cases:
            if args.smoke:
                case = replace(case, batch=min(case.batch, 8), warmup=2, steps=3)
            for augment_on in args.augment_on:
                recipe = apply_overrides(_recipe(case, data_path, args), [f"data.augment_on={augment_on}"])
                result = {"augment_on": augment_on, **measure(recipe, case, Path(tmp) / f"{recipe.name}_{augment_on}")}
                print(json.dumps(result), flush=True)


def _default_data(suite: str | None, tmp: Path, smoke: bool) -> str:
    """The CPU config reads CIFAR-10; the GPU set reads a folder of JPEG files, generated when none is given."""
    if suite == "gpu":
        return str(make_jpeg_folder(tmp / "jpegs", 64 if smoke else 2048, 64 if smoke else 400))
    if smoke:
        return "digits"
    if not CIFAR10.is_dir():
        sys.exit(f"no CIFAR-10 copy at {CIFAR10}; pass --data PATH (any data.path sslvit accepts)")
    return str(CIFAR10)


def make_jpeg_folder(folder: Path, count: int, size: int) -> Path:
    """Write ``count`` JPEGs of about ``size`` px (ImageNet-like: smooth colour fields plus noise, quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = int(size * rng.uniform(0.75, 1.0)), int(size * rng.uniform(0.9, 1.25))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        phase = rng.uniform(0, 2 * np.pi, (3, 1, 1))
        field_ = 0.5 + 0.4 * np.sin(6 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) + phase)
        pixels = np.clip(field_ * 255 + rng.normal(0, 12, (3, h, w)), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _recipe(case: Case, data_path: str, args: argparse.Namespace) -> Recipe:
    recipe = load_recipe(case.recipe)
    overrides = [
        f"data.path={data_path}",
        "train.global_batch_size=0",  # no accumulation: one micro-batch of ``batch`` images per step
        f"train.batch_size_per_device={case.batch}",
        f"train.max_steps={case.warmup + case.steps + 1}",  # +1: the last timed step ends where the next begins
        *case.overrides,
    ]
    if args.smoke:
        overrides += [*SMOKE, *SMOKE_OBJECTIVE[recipe.objective.name]]
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    recipe = apply_overrides(recipe, [*overrides, *args.set])
    recipe.validate()
    return recipe


def measure(recipe: Recipe, case: Case, run_dir: Path) -> dict:
    """Bare step (half its windows before, half after), the e2e run, the loader alone -> one JSON object."""
    step = bare_step(recipe)
    per_window, bare = max(case.steps // BARE_WINDOWS, 1), []
    for _ in range(min(case.warmup, 3)):  # warm-up: allocator, first-call costs
        step()
    bare += [_time_window(step, per_window) for _ in range(BARE_WINDOWS // 2)]
    e2e = time_pretrain(recipe, run_dir, case.warmup, case.steps)
    bare += [_time_window(step, per_window) for _ in range(BARE_WINDOWS // 2)]
    loader_ips = time_loader(recipe, warmup=2, batches=max(case.steps // 2, 4))
    batch = recipe.train.batch_size_per_device
    bare_ips = batch * per_window / statistics.median(wall for wall, _ in bare)
    bare_cpu = statistics.median(cpu for _, cpu in bare) / (batch * per_window) * 1e3
    return {
        "benchmark": "pretrain_e2e",
        "recipe": recipe.name,
        "objective": recipe.objective.name,
        "model": recipe.model.name,
        "img_size": recipe.model.img_size,
        "batch": batch,
        "precision": recipe.train.precision,
        "num_workers": data.resolve_num_workers(
            recipe.data, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ),
        "data": recipe.data.path,
        "timed_steps": case.steps,
        **e2e,
        "bare_images_per_s": round(bare_ips, 2),
        "loader_images_per_s": round(loader_ips, 2),
        "e2e_over_bare": round(e2e["e2e_images_per_s"] / bare_ips, 3),
        "loader_over_bare": round(loader_ips / bare_ips, 3),
        "bare_cpu_ms_per_image": round(bare_cpu, 3),
        "e2e_cpu_over_bare_cpu": round(e2e["e2e_cpu_ms_per_image"] / bare_cpu, 3),
        "device": _device(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def _time_window(step, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for ``steps`` calls of ``step``, the device synchronised."""
    _synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    _synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process and by its live children (the DataLoader workers)."""
    children = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return time.process_time(), children


class _StepClock(train_module.LoopCallback):
    """Time-stamps the start of steps ``warmup`` and ``warmup + steps``; keeps the last time of each periodic cost."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.marks, self.stamps, self.once = (warmup, warmup + steps), {}, Counter()

    def on_step_start(self, step: int) -> None:
        if step in self.marks:
            self.stamps[step] = (time.perf_counter(), *_cpu_seconds())

    def on_periodic(self, what: str, seconds: float) -> None:
        self.once[f"{what}_s"] = seconds  # the last one: warm, as in a long run


def time_pretrain(recipe: Recipe, run_dir: Path, warmup: int, steps: int) -> dict:
    """Run :func:`sslvit.train.pretrain`, time-stamping each step's start; amortise the periodic costs."""
    clock = _StepClock(warmup, steps)
    begin = time.perf_counter()
    train_module.pretrain(recipe, run_dir, callback=clock)
    wall = time.perf_counter() - begin
    (t0, main0, workers0), (t1, main1, workers1) = clock.stamps[warmup], clock.stamps[warmup + steps]
    once = {"checkpoint_s": clock.once["checkpoint_s"], "image_log_s": clock.once["images_s"]}
    step_s = (t1 - t0) / steps
    periodic = {"checkpoint_s": recipe.train.checkpoint_every, "image_log_s": recipe.log.image_every}
    amortised = sum(once[key] / every for key, every in periodic.items() if every)
    batch = recipe.train.batch_size_per_device
    images = batch * steps
    return {
        "e2e_images_per_s": round(batch / (step_s + amortised), 2),
        "e2e_steady_images_per_s": round(batch / step_s, 2),
        "checkpoint_s": round(once["checkpoint_s"], 3),
        "checkpoint_every": recipe.train.checkpoint_every,
        "image_log_s": round(once["image_log_s"], 3),
        "image_every": recipe.log.image_every,
        "e2e_wall_s": round(wall, 1),
        "e2e_cpu_ms_per_image": round((main1 - main0 + workers1 - workers0) / images * 1e3, 3),
        "loader_workers_cpu_ms_per_image": round((workers1 - workers0) / images * 1e3, 3),
    }


def time_loader(recipe: Recipe, warmup: int, batches: int) -> float:
    """Images/s of the pretraining DataLoader alone: same source, views, seeding, workers and batch."""
    # the loop's own data opening (decode cache included); the accelerator is read only for a stream
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # sizes data.num_workers=-1
    where = SimpleNamespace(device=device, process_index=0, num_processes=1)
    dataset, _, _ = train_module._open_data(recipe, train_module.build_objective(recipe)[0], where)
    loader = data.make_loader(
        dataset,
        recipe.train.batch_size_per_device,
        shuffle=True,
        drop_last=True,
        cfg=recipe.data,
        seed=recipe.train.seed,
        device=device,
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(it)["labels"])
    elapsed = time.perf_counter() - start
    del it  # shut the workers down
    return images / elapsed


def bare_step(recipe: Recipe):
    """The loop's own step on synthetic views, as benchmarks/throughput.py times it (mid-schedule, no data)."""
    precision = "fp32" if recipe.train.precision == "no" else recipe.train.precision
    batch = recipe.train.batch_size_per_device
    cfg = Config(
        recipe.objective.name,
        recipe.model.name,
        recipe.model.img_size,
        recipe.model.patch_size,
        batch,
        precision=precision,
    )
    return sslvit_step(replace(recipe, train=replace(recipe.train, max_steps=TOTAL_STEPS)), cfg)[0]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
