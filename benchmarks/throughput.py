"""Training step throughput: sslvit's real training step against lightly's example-style step, FLOPs and MFU.

For one objective and config, in one process on one device, on synthetic tensors: images per second of full
optimisation steps (warm-up excluded; the median of timed windows that alternate between the two steps), model
FLOPs per image, achieved FLOP/s, the FLOP/s of a large matmul timed between the same windows (the peak), and
MFU = achieved / peak. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (forward,
backward, teacher, loss): it counts matmuls, convolutions and attention, not elementwise ops; attention is counted
on timm's math path because the CPU's fused attention kernel has no FLOP formula.

The sslvit step is the loop's own code (``sslvit.train.optimisation_step``: schedules, ``before_step``,
forward/backward, optimizer, ``after_step``) on an objective built from a recipe. The reference step is built the way
lightly's examples build MAE and DINO (lightly ``examples/pytorch/mae.py`` and ``dino.py``) on the identical timm
ViT, head sizes, AdamW hyperparameters and precision: ``a_over_b`` is sslvit / lightly. ``--compare`` instead
times sslvit against itself with one step-level lever changed. One JSON object per measurement on stdout.

    python benchmarks/throughput.py --suite cpu
    python benchmarks/throughput.py --objective mae --model vit_tiny_patch16_224 --img 32 --patch 4 --batch 64
    python benchmarks/throughput.py --objective dino --model vit_tiny_patch16_224 --img 32 --patch 4 --batch 64 \
        --local-crops 6 --local-size 16 --compare adamw:single
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from lightly.loss import DINOLoss
from lightly.models import utils
from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sslvit.accel import make_accelerator
from sslvit.backbone import build_backbone, set_fused_attention
from sslvit.objectives import OBJECTIVES
from sslvit.recipe import Recipe, apply_overrides, load_recipe
from sslvit.train import build_objective, make_optimizer, optimisation_step, prefer_math_attention
from sslvit.training.derived import derive
from sslvit.training.state import Trainer

TOTAL_STEPS = 1_000_000  # the schedules' length; timing starts half-way: past warmup and the frozen last layer
DEFAULT_RECIPES = {"mae": ("mae_vit_tiny_cifar", "mae_vit_b"), "dino": ("dino_vit_tiny_cifar", "dino_vit_s16")}
COMPARE = ("lightly", "precision", "compile", "attn:fused", "attn:math", "adamw:single", "adamw:foreach", "adamw:fused")


@dataclass
class Config:
    """One measurement; ``windows`` x ``steps`` timed steps per side after ``warmup`` untimed ones."""

    objective: str
    model: str
    img: int
    patch: int
    batch: int
    precision: str = "fp32"
    compile: bool = False
    local_crops: int | None = None  # DINO: local crops per image (None = the recipe's)
    local_size: int | None = None
    recipe: str | None = None  # None: the CIFAR recipe of the objective for img <= 64, else the ImageNet one
    overrides: list[str] = field(default_factory=list)
    windows: int = 5
    steps: int = 4
    warmup: int = 2
    compare: str = "lightly"
    matmul_size: int = 2048


# The CPU set: the CIFAR config. bf16 autocast is the faster precision on a CPU with AMX (see BENCHMARKS.md).
# DINO runs ~1.5 s/step at batch 64 in bf16 on 2 cores: shorter windows keep the suite near 2 minutes.
TINY = {"model": "vit_tiny_patch16_224", "img": 32, "patch": 4, "batch": 64, "precision": "bf16"}
SUITES = {
    "cpu": [
        Config(objective="mae", **TINY, windows=7, steps=5, warmup=3),
        Config(objective="dino", **TINY, local_crops=6, local_size=16, windows=7, steps=2, warmup=2),
    ],
    # The GPU set: the recipes' per-GPU batch (64) in bf16; DINO with the issue's 2 x 224 + 10 x 96 crops.
    "gpu": [
        Config(objective="mae", model="vit_base_patch16_224", img=224, patch=16, batch=64, precision="bf16",
               windows=7, steps=10, warmup=5, matmul_size=8192),
        Config(objective="dino", model="vit_small_patch16_224", img=224, patch=16, batch=64, precision="bf16",
               local_crops=10, local_size=96, windows=7, steps=10, warmup=5, matmul_size=8192),
    ],
}  # fmt: skip


def make_recipe(cfg: Config) -> Recipe:
    """The objective's recipe with the benchmark's model, batch, precision and crops; no accumulation."""
    if not cfg.recipe and cfg.objective not in DEFAULT_RECIPES:
        raise SystemExit(f"--objective {cfg.objective} has no default recipe here; pass --recipe NAME_OR_FILE")
    name = cfg.recipe or DEFAULT_RECIPES[cfg.objective][cfg.img > 64]
    sets = [
        f"model.name={cfg.model}",
        f"model.img_size={cfg.img}",
        f"model.patch_size={cfg.patch}",
        "train.global_batch_size=0",
        f"train.batch_size_per_device={cfg.batch}",
        f"train.max_steps={TOTAL_STEPS}",
        f"train.precision={'no' if cfg.precision == 'fp32' else cfg.precision}",
    ]
    if cfg.objective == "dino":
        sets.append(f"objective.global_crop_size={cfg.img}")
        sets += [f"objective.local_crops_number={cfg.local_crops}"] if cfg.local_crops is not None else []
        sets += [f"objective.local_crop_size={cfg.local_size}"] if cfg.local_size is not None else []
    recipe = apply_overrides(load_recipe(name), [*sets, *cfg.overrides])
    recipe.validate()
    return recipe


def synthetic_views(recipe: Recipe, batch: int, device: torch.device, objective: nn.Module | None = None):
    """Normalised-image-like noise in the objective's view layout (DINO: 2 global crops, then the local ones).

    With ``objective``, the layout is read from its own ``views()`` (any objective in the table); without, it is
    MAE's or DINO's (the lightly reference steps).
    """
    if objective is not None:
        views = objective.views()(Image.new("RGB", (recipe.model.img_size,) * 2))
        sizes = [v.shape[-1] for v in (views if isinstance(views, list) else [views])]
    else:
        sizes = [recipe.model.img_size]
    if objective is None and recipe.objective.name == "dino":
        o = recipe.objective
        sizes = [o.global_crop_size] * 2 + [o.local_crop_size] * o.local_crops_number
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, s, s, generator=generator).to(device) for s in sizes]


def new_accelerator(precision: str, compile: bool):
    """A fresh Accelerator; the previous one's global state is reset so that two precisions can be compared."""
    AcceleratorState._reset_state(reset_partial_state=False)
    kwargs = {"dynamo_backend": "inductor"} if compile else {}
    return make_accelerator(mixed_precision="no" if precision == "fp32" else precision, **kwargs)


def sslvit_step(recipe: Recipe, cfg: Config, lever: str = "") -> tuple[Callable[[], None], nn.Module]:
    """The loop's step (sslvit.train) on synthetic views -> (one optimisation step, the objective)."""
    precision = {"fp32": "bf16", "bf16": "fp32"}[cfg.precision] if lever == "precision" else cfg.precision
    accelerator = new_accelerator(precision, cfg.compile != (lever == "compile"))
    objective, _ = build_objective(recipe)
    derived = derive(recipe, accelerator.num_processes, None)
    optimizer = make_optimizer(objective, recipe, derived)
    if lever.startswith("adamw:"):  # the same groups and hyperparameters, another AdamW implementation
        impl = lever.removeprefix("adamw:")
        groups = [{k: v for k, v in group.items() if k not in ("foreach", "fused")} for group in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, foreach=impl == "foreach", fused=impl == "fused")
    prefer_math_attention(objective, accelerator.device, accelerator.mixed_precision)
    if lever.startswith("attn:"):  # timm's fused (SDPA) attention forced on or off
        set_fused_attention(objective, lever == "attn:fused")
    model, optimizer = accelerator.prepare(objective, optimizer)
    views = synthetic_views(recipe, cfg.batch, accelerator.device, objective)
    batches = itertools.repeat((0, {"views": views, "skipped": {}}))
    trainer, steps = Trainer(accelerator, model, optimizer, recipe, derived), itertools.count(TOTAL_STEPS // 2)

    def step() -> None:
        optimisation_step(trainer, batches, next(steps))

    return step, objective


class LightlyMAE(nn.Module):
    """lightly's ``examples/pytorch/mae.py`` model, sized by the recipe (decoder width, depth, heads)."""

    def __init__(self, vit: nn.Module, cfg) -> None:
        super().__init__()
        self.mask_ratio = cfg.mask_ratio
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, cfg.decoder_embed_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=cfg.decoder_embed_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
            mlp_ratio=4.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
        )
        self.prediction_head = nn.Linear(cfg.decoder_embed_dim, self.patch_size**2 * 3)
        self.criterion = nn.MSELoss()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        idx_keep, idx_mask = utils.random_token_mask(
            size=(images.shape[0], self.sequence_length), mask_ratio=self.mask_ratio, device=images.device
        )
        x_decode = self.decoder_embed(self.backbone.encode(images=images, idx_keep=idx_keep))
        x_masked = x_decode.new_zeros(images.shape[0], self.sequence_length, x_decode.shape[-1])
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_pred = self.prediction_head(utils.get_at_index(self.decoder(x_masked, idx_mask=idx_mask), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return self.criterion(x_pred, target)


class LightlyDINO(nn.Module):
    """lightly's ``examples/pytorch/dino.py`` model on the recipe's timm ViT and head sizes."""

    def __init__(self, backbone: nn.Module, cfg) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
            head = [backbone.embed_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim]
            kwargs = {"freeze_last_layer": cfg.freeze_last_layer, "norm_last_layer": cfg.norm_last_layer}
            self.student_head = DINOProjectionHead(*head, **kwargs)
            self.teacher_head = DINOProjectionHead(*head, **kwargs)
        self.student_backbone = backbone
        self.teacher_backbone = copy.deepcopy(backbone)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


def lightly_step(recipe: Recipe, cfg: Config) -> tuple[Callable[[], None], nn.Module]:
    """lightly's example training step, on the same device, precision and AdamW hyperparameters."""
    device = AcceleratorState().device
    objective_cfg = recipe.objective
    vit = build_backbone(recipe.model, **OBJECTIVES[objective_cfg.name].backbone_kwargs(objective_cfg))
    model = (LightlyMAE(vit, objective_cfg) if objective_cfg.name == "mae" else LightlyDINO(vit, objective_cfg)).to(
        device
    )
    lr = derive(recipe, 1, None).lr
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=recipe.optim.betas, weight_decay=recipe.optim.weight_decay
    )
    views = synthetic_views(recipe, cfg.batch, device)
    forward = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if objective_cfg.name == "mae":

        def step() -> None:
            with autocast:
                loss = forward(views[0])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step, model
    criterion = DINOLoss(
        output_dim=objective_cfg.out_dim,
        warmup_teacher_temp=objective_cfg.warmup_teacher_temp,
        teacher_temp=objective_cfg.teacher_temp,
        warmup_teacher_temp_epochs=objective_cfg.warmup_teacher_temp_epochs,
        student_temp=objective_cfg.student_temp,
        center_momentum=objective_cfg.center_momentum,
    ).to(device)
    epochs = recipe.schedule.epochs
    epoch = epochs // 2  # the sslvit step's schedule position: half-way

    def step() -> None:
        momentum = cosine_schedule(epoch, epochs, objective_cfg.momentum_teacher, 1)
        update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
        update_momentum(model.student_head, model.teacher_head, m=momentum)
        with autocast:
            teacher_out = [model.forward_teacher(view) for view in views[:2]]
            student_out = [forward(view) for view in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
        optimizer.step()
        optimizer.zero_grad()

    return step, model


def count_flops(step: Callable[[], None], model: nn.Module) -> int:
    """FLOPs of one whole step, eager and on timm's math attention (the CPU's SDPA kernel has no FLOP formula)."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    set_fused_attention(model, False)
    stance = (
        torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    )
    try:
        with stance, FlopCounterMode(display=False) as counter:
            step()
    finally:
        for module, value in fused.items():
            module.fused_attn = value
    return counter.get_total_flops()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 0.3) -> Callable[[], float]:
    """A sampler of the FLOP/s of an ``n^3`` matmul in ``dtype`` (each sample runs about ``seconds``)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    reps = max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))

    def sample() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return 2 * n**3 * reps / (time.perf_counter() - start)

    return sample


def run(cfg: Config) -> dict:
    """Measure one config: both steps interleaved window by window, plus the matmul peak between windows."""
    started = time.perf_counter()
    recipe = make_recipe(cfg)
    torch.manual_seed(0)
    a_step, a_model = sslvit_step(recipe, cfg)
    b_step, b_model = lightly_step(recipe, cfg) if cfg.compare == "lightly" else sslvit_step(recipe, cfg, cfg.compare)
    device = AcceleratorState().device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    peak = matmul_flops_per_s(device, dtype, cfg.matmul_size)
    warmup = {"a": 0.0, "b": 0.0}  # the first steps: allocator warm-up, and compilation under --compile
    for _ in range(cfg.warmup):
        for side, step in (("a", a_step), ("b", b_step)):
            start = time.perf_counter()
            step()
            sync()
            warmup[side] += time.perf_counter() - start
    flops = {"a": count_flops(a_step, a_model) / cfg.batch, "b": count_flops(b_step, b_model) / cfg.batch}
    samples: dict[str, list[float]] = {"a": [], "b": [], "peak": []}
    for window in range(cfg.windows):
        samples["peak"].append(peak())
        for side, step in [("a", a_step), ("b", b_step)][:: 1 if window % 2 == 0 else -1]:
            sync()
            start = time.perf_counter()
            for _ in range(cfg.steps):
                step()
            sync()
            samples[side].append(cfg.steps * cfg.batch / (time.perf_counter() - start))
    return report(cfg, recipe, device, flops, samples, warmup, time.perf_counter() - started)


def report(cfg: Config, recipe: Recipe, device, flops: dict, samples: dict, warmup: dict, seconds: float) -> dict:
    """The JSON record of one measurement: medians over the windows.

    ``a_over_b`` is the median of the per-window ratios (each A window next to its B window), which a change of
    machine load between windows moves less than a ratio of the two medians.
    """
    ips = {side: statistics.median(samples[side]) for side in ("a", "b")}
    peak = statistics.median(samples["peak"])
    crops = f"1x{cfg.img}"
    if recipe.objective.name == "dino":
        o = recipe.objective
        crops = f"2x{o.global_crop_size}+{o.local_crops_number}x{o.local_crop_size}"
    toggled = {"precision": "fp32" if cfg.precision == "bf16" else "bf16", "compile": f"compile={not cfg.compile}"}
    name = f"sslvit+{toggled.get(cfg.compare, cfg.compare)}"
    return {
        "benchmark": "train_step_throughput",
        "objective": cfg.objective,
        "recipe": recipe.name,
        "model": cfg.model,
        "img": cfg.img,
        "patch": cfg.patch,
        "crops": crops,
        "batch": cfg.batch,
        "precision": cfg.precision,
        "compile": cfg.compile,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "a": "sslvit",
        "b": "lightly" if cfg.compare == "lightly" else name,
        "a_images_per_s": round(ips["a"], 2),
        "b_images_per_s": round(ips["b"], 2),
        "a_over_b": round(statistics.median(a / b for a, b in zip(samples["a"], samples["b"])), 3),
        "a_flops_per_image": flops["a"],
        "b_flops_per_image": flops["b"],
        "a_achieved_flops_per_s": round(flops["a"] * ips["a"]),
        "b_achieved_flops_per_s": round(flops["b"] * ips["b"]),
        "matmul": f"{cfg.matmul_size}^3 {cfg.precision}",
        "matmul_peak_flops_per_s": round(peak),
        "a_mfu": round(flops["a"] * ips["a"] / peak, 3),
        "b_mfu": round(flops["b"] * ips["b"] / peak, 3),
        "a_warmup_s": round(warmup["a"], 1),
        "b_warmup_s": round(warmup["b"], 1),
        "windows": cfg.windows,
        "steps_per_window": cfg.steps,
        "warmup_steps": cfg.warmup,
        "a_window_images_per_s": [round(v, 1) for v in samples["a"]],
        "b_window_images_per_s": [round(v, 1) for v in samples["b"]],
        "flops_counted": "FlopCounterMode, one whole step: matmul/conv/attention only (no elementwise ops)",
        "wall_s": round(seconds, 1),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return device.type


def parse_args(argv: list[str] | None = None) -> list[Config]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=sorted(SUITES), help="run a preset set (the other flags are ignored)")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="mae")
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="exact timm model name")
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile both steps (Accelerate's inductor)")
    parser.add_argument("--local-crops", type=int, help="DINO: local crops per image")
    parser.add_argument("--local-size", type=int, help="DINO: local crop size in pixels")
    parser.add_argument("--recipe", help="recipe to start from (default: the objective's CIFAR or ImageNet recipe)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", help="extra recipe overrides key=value")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed window")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compare", choices=COMPARE, default="lightly", help="what sslvit's step is timed against")
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.suite:
        return [dataclasses.replace(c) for c in SUITES[args.suite]]
    fields = {f.name for f in dataclasses.fields(Config)}
    return [Config(**{k: v for k, v in vars(args).items() if k in fields})]


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    for cfg in parse_args(argv):
        print(json.dumps(run(cfg)), flush=True)


if __name__ == "__main__":
    main()
