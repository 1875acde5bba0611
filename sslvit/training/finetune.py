"""Full fine-tuning of a pretrained encoder into a classifier: the MAE protocol, through timm, on Accelerate.

[0]: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021, https://arxiv.org/abs/2111.06377, A.1;
reference code: facebookresearch/mae ``main_finetune.py`` / ``engine_finetune.py`` at
6a2ba402291005b003a70e99f7c87d1a2c376b0d, and FINETUNE.md (ViT-B: blr 5e-4, layer decay 0.65, drop path 0.1,
global batch 1024, 100 epochs).

Layer-wise lr decay (timm ``param_groups_layer_decay``), drop path, RandAugment ``rand-m9-mstd0.5-inc1`` and random
erasing 0.25 (timm ``create_transform``), Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 (timm ``Mixup`` +
``SoftTargetCrossEntropy``), AdamW, linear warmup + cosine per iteration (timm ``CosineLRScheduler``), global-average
pool with ``fc_norm`` (MAE's default) or the CLS token. The global batch is ``batch_size_per_device x processes x
accum_steps`` and the lr ``base_lr x global batch / 256``. A checkpoint is saved every epoch (Accelerate
``save_state``); running the same command again resumes. The model is evaluated on the test split after every
epoch (best and last accuracy are reported, as MAE reports its max) and exported in timm's ``local-dir`` layout.

Named fine-tuning recipes live next to the pretraining ones, as ``recipes/finetune_*.py`` files that define
``RECIPE = FinetuneConfig(...)``: ``finetune_mae`` (these defaults), ``finetune_deit`` (DeiT's ImageNet recipe:
repeated augmentation through timm's ``RepeatAugSampler``, no layer decay, warmup from 1e-6) and
``finetune_deit_small_data``. ``sslvit finetune --recipe NAME`` picks one, ``--list-recipes`` lists them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import pkgutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from timm.scheduler import CosineLRScheduler

from sslvit.accel import make_accelerator
from sslvit.checkpoint import export_encoder, latest_checkpoint, save_checkpoint
from sslvit.data import ImageSource
from sslvit.errors import CheckpointError, RecipeError
from sslvit.evaluation.features import eval_loader
from sslvit.recipe import RECIPE_PACKAGE, DataConfig, load_recipe_file
from sslvit.training.accumulate import Forward, MicroBatches, accumulate_gradients
from sslvit.training.finetune_data import _train_loader
from sslvit.training.loop import micro_batches
from sslvit.training.schedules import plan_batch
from sslvit.training.state import resume_latest
from sslvit.views import eval_transform
from sslvit.weights import create_model, fit_state_dict

log = logging.getLogger("sslvit.evaluation")


FINETUNE_PREFIX = "finetune_"  # recipes/finetune_*.py are fine-tuning recipes; the other files pretrain
DEFAULT_RECIPE = "finetune_mae"


@dataclass
class FinetuneConfig:
    """MAE's fine-tuning recipe for ViT-B (FINETUNE.md); every field can be set with ``--set key=value``."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    min_warmup_steps: int = 0  # warmup lasts at least this many steps (a small set has few steps per epoch)
    warmup_lr: float = 0.0  # the lr warmup starts from (MAE: 0; DeiT: 1e-6)
    batch_size_per_device: int = 64  # --batch-size sets it
    accum_steps: int = 1  # MAE ViT-B: 1024 images per step, e.g. 64 x 8 GPUs x 2
    base_lr: float = 5e-4  # per 256 images
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # ViT-B; MAE uses 0.75 for ViT-L/H
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path_rate: float = 0.1
    global_pool: Literal["avg", "token"] = "avg"
    scale_min: float = 0.08  # random-resized-crop scale (scale_min, 1); small images (digits) want ~0.5
    hflip: float = 0.5  # flip probability; 0 for data where a mirror image is another class (digits, text)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # "" = none
    reprob: float = 0.25
    repeated_aug: int = 1  # each sampled image this many times in a row, augmented independently (DeiT: 3); 1 = off
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    clip_grad: float = 0.0  # 0 = none (MAE: none)
    precision: Literal["no", "fp16", "bf16"] = "no"
    keep_checkpoints: int = 2
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.epochs > 0, "epochs must be positive"),
            (self.accum_steps > 0, "accum_steps must be positive"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be between 0 and epochs"),
            (0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (0 <= self.drop_path_rate < 1, "drop_path_rate must be in [0, 1)"),
            (0 < self.scale_min <= 1, "scale_min must be in (0, 1]"),
            (self.batch_size_per_device > 0, "batch_size_per_device must be positive"),
            (self.min_warmup_steps >= 0 and self.warmup_lr >= 0, "min_warmup_steps and warmup_lr must be >= 0"),
            (self.repeated_aug >= 1, "repeated_aug must be >= 1 (1 = off, DeiT: 3)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"finetune: {message}")
        if self.mixup_active and self.batch_size_per_device % 2:
            raise RecipeError("Mixup/CutMix need an even --batch-size (or set mixup=0 cutmix=0)")

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def list_finetune_recipes() -> dict[str, str]:
    """The shipped fine-tuning recipes: name -> the first line of the file's docstring, sorted by name."""
    package = importlib.import_module(RECIPE_PACKAGE)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith(FINETUNE_PREFIX))
    return {name: _summary_line(importlib.import_module(f"{RECIPE_PACKAGE}.{name}").__doc__) for name in names}


def load_finetune_recipe(name_or_path: str) -> tuple[str, FinetuneConfig]:
    """A fine-tuning recipe by name (``recipes/finetune_*.py``) or by path to a file defining ``RECIPE``.

    Loaded as pretraining recipes are (:func:`sslvit.recipe.load_recipe_file`).

    Returns:
        ``(name, a deep copy of its FinetuneConfig)``: ``--set`` overrides never leak into the module's object.

    Raises:
        RecipeError: unknown name, missing file, or no ``RECIPE = FinetuneConfig(...)`` in it.
    """
    return load_recipe_file(name_or_path, FinetuneConfig, list(list_finetune_recipes()), "fine-tuning recipe")


def _summary_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


def build_classifier(
    encoder: torch.nn.Module, identity: dict[str, Any], num_classes: int, cfg: FinetuneConfig
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The encoder's timm architecture with a ``num_classes`` head, loaded from the encoder's weights.

    ViT: with ``global_pool="avg"`` timm drops the final ``norm`` for an ``fc_norm`` after pooling, as MAE does:
    only the head (and ``fc_norm``) are new, only ``norm`` is left over. Other timm families (a DINO ConvNeXt,
    Swin, ...) keep their own pooling; only their classifier (``get_classifier()``) is new. Anything else missing
    or left over is a CheckpointError. The weights go through the shared fit (:func:`sslvit.weights.fit_state_dict`):
    ``pos_embed`` is resampled if the encoder's grid differs.

    Returns:
        ``(model, create_model arguments that rebuild it)``.
    """
    is_vit = isinstance(encoder, VisionTransformer)
    args = {**identity["model_args"], "num_classes": num_classes}
    if is_vit:
        args["global_pool"] = cfg.global_pool
    architecture = identity["architecture"]
    model = create_model(architecture, {**args, "drop_path_rate": cfg.drop_path_rate})
    classifier = model.get_classifier()
    head = next(name for name, module in model.named_modules() if module is classifier) + "."
    avg = is_vit and cfg.global_pool == "avg"
    new_ok, ignore_ok = ((head, "fc_norm."), ("norm.",)) if avg else ((head,), ())
    target = f"{architecture} with a classifier head"
    fit_state_dict(model, encoder.state_dict(), "the encoder", target, new_ok=new_ok, ignore_ok=ignore_ok)
    torch.nn.init.trunc_normal_(classifier.weight, std=2e-5)  # MAE: following MoCo v3
    torch.nn.init.zeros_(classifier.bias)
    return model, args


def criterion_and_mixup(cfg: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, Mixup | None]:
    """Soft-target cross-entropy with Mixup/CutMix (which also smooths labels), else smoothed/plain cross-entropy."""
    if cfg.mixup_active:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, accelerator: Accelerator, num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of ``model`` on an :func:`~sslvit.evaluation.features.eval_loader`."""
    model.eval()
    hits = torch.zeros(3)
    for images, labels, _, ok in loader:
        with accelerator.autocast():
            ranked = model(images).topk(min(5, num_classes), dim=1).indices
        match = ranked.eq(labels.view(-1, 1))
        found = accelerator.gather_for_metrics(torch.stack([match[:, 0], match.any(1), ok.bool()], dim=1).float())
        hits += found[found[:, 2] > 0].sum(0).cpu()
    model.train()
    seen = max(hits[2].item(), 1)
    return {"top1": 100.0 * hits[0].item() / seen, "top5": 100.0 * hits[1].item() / seen}


def _train_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batches: MicroBatches,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: CosineLRScheduler,
    forward: Forward,
    cfg: FinetuneConfig,
    step: int,
    where: str,
) -> tuple[int, float]:
    """``steps`` optimisation steps over ``batches``, accumulated as pretraining does; returns (step, mean loss)."""
    losses, skipped = [], Counter()
    for _ in range(steps):
        scheduler.step_update(step)
        _, outputs, bad = accumulate_gradients(accelerator, model, batches, cfg.accum_steps, forward, where)
        if cfg.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(outputs["loss"])
        skipped.update(bad)
    if skipped and accelerator.is_main_process:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
        log.warning("finetune: skipped %d undecodable training image(s) this epoch (%s)", skipped.total(), reasons)
    mean = float(accelerator.reduce(torch.stack(losses).mean(), "mean")) if losses else math.nan
    return step, mean


def _classification_loss(accelerator: Accelerator, model: torch.nn.Module, criterion, mixup: Mixup | None) -> Forward:
    """The fine-tuning forward on one micro-batch: Mixup/CutMix (on an even batch), the classifier, the criterion."""

    def forward(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["views"], batch["labels"]
        if mixup is not None and len(images) % 2:  # a skipped image left an odd batch: Mixup pairs need an even one
            images, labels = images[:-1], labels[:-1]
        if mixup is not None:
            images, labels = mixup(images, labels)
        with accelerator.autocast():
            return {"loss": criterion(model(images), labels)}

    return forward


def finetune(
    encoder: torch.nn.Module,
    identity: dict[str, Any],
    train_source: ImageSource,
    test_source: ImageSource,
    cfg: FinetuneConfig,
    *,
    out_dir: Path,
    data_cfg: DataConfig,
    train_indices: np.ndarray,
    test_indices: np.ndarray,
    crop_pct: float,
) -> dict[str, Any]:
    """Fine-tune ``encoder`` on ``train_source[train_indices]``, evaluating on ``test_source[test_indices]``.

    Every process runs it. Checkpoints go to ``out_dir/checkpoints`` (resumed from when present), the model to
    ``out_dir/model`` (timm ``local-dir``: ``timm.create_model("local-dir:" + path, pretrained=True)``).

    Returns:
        ``hyperparameters``, ``metrics`` (``top1``/``top5`` of the last epoch, ``best_top1`` and its epoch),
        ``history`` (per epoch), ``model_dir``, ``resumed_from_epoch``.
    """
    cfg.validate()
    accelerator = make_accelerator(  # accumulation is the loop's, as in pretraining (training.accumulate)
        mixed_precision=cfg.precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    num_classes, img_size = len(train_source.class_names), identity["img_size"]
    model, model_args = build_classifier(encoder, identity, num_classes, cfg)
    loader = _train_loader(train_source, train_indices, img_size, cfg, data_cfg, accelerator.num_processes)
    batch = plan_batch(cfg.batch_size_per_device, accelerator.num_processes, cfg.base_lr, accum_steps=cfg.accum_steps)
    derived = {"global_batch_size": batch.global_batch, "lr": batch.lr}
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()  # ViT/Swin list tokens; CNNs don't
    groups = param_groups_layer_decay(model, cfg.weight_decay, no_decay, layer_decay=cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=derived["lr"], betas=cfg.betas)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    test_loader = eval_loader(
        test_source,
        test_indices,
        eval_transform(img_size, crop_pct),
        img_size,
        cfg.batch_size_per_device,
        data_cfg,
        accelerator,
    )
    steps_per_epoch = len(loader) // cfg.accum_steps  # an epoch ends on a whole step: the rest is left out
    scheduler = _scheduler(optimizer, cfg, steps_per_epoch, derived)
    forward = _classification_loss(accelerator, model, *criterion_and_mixup(cfg, num_classes))
    start_epoch, step, history = _resume(accelerator, out_dir / "checkpoints", identity["sha256"])
    batches = micro_batches(accelerator, loader, False, start_epoch, 0, steps_per_epoch * cfg.accum_steps)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        args = (optimizer, scheduler, forward, cfg, step, data_cfg.path)
        step, loss = _train_epoch(accelerator, model, batches, steps_per_epoch, *args)
        history.append({"epoch": epoch + 1, "loss": loss, **evaluate(model, test_loader, accelerator, num_classes)})
        log.info("finetune epoch %d/%d: loss %.4f, test top1 %.2f", epoch + 1, cfg.epochs, loss, history[-1]["top1"])
        state = {"epoch": epoch + 1, "step": step, "history": history, "encoder_sha256": identity["sha256"]}
        save_checkpoint(accelerator, out_dir / "checkpoints", step, cfg.keep_checkpoints, state)
    if accelerator.is_main_process:
        export_encoder(accelerator.unwrap_model(model), identity["architecture"], model_args, out_dir / "model")
        (out_dir / "model" / "class_names.json").write_text(json.dumps(train_source.class_names))
    accelerator.wait_for_everyone()
    derived.update(
        world_size=accelerator.num_processes,
        train_size=len(train_indices),
        test_size=len(test_indices),
        img_size=img_size,
    )
    return _summary(cfg, derived, history, out_dir / "model", start_epoch)


def _scheduler(optimizer: Any, cfg: FinetuneConfig, steps_per_epoch: int, derived: dict[str, Any]) -> Any:
    """Linear warmup from ``warmup_lr``, then a cosine to ``min_lr``, per step; groups keep their ``lr_scale``.

    The warmup lasts ``warmup_epochs``, but at least ``min_warmup_steps`` (and at most the whole run).
    """
    total = steps_per_epoch * cfg.epochs
    warmup = min(max(round(steps_per_epoch * cfg.warmup_epochs), cfg.min_warmup_steps), total)
    derived.update(steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def _summary(
    cfg: FinetuneConfig, derived: dict[str, Any], history: list[dict[str, Any]], model_dir: Path, start_epoch: int
) -> dict[str, Any]:
    last = history[-1] if history else {}
    best = max(history, key=lambda h: h["top1"]) if history else {}
    metrics = {
        "top1": last.get("top1"),
        "top5": last.get("top5"),
        "best_top1": best.get("top1"),
        "best_epoch": best.get("epoch"),
    }
    return {
        "hyperparameters": {**dataclasses.asdict(cfg), **derived},
        "metrics": metrics,
        "history": history,
        "model_dir": str(model_dir),
        "resumed_from_epoch": start_epoch,
    }


def _resume(accelerator: Accelerator, root: Path, encoder_sha: str) -> tuple[int, int, list[dict[str, Any]]]:
    """Load the newest complete checkpoint under ``root``; return (epochs done, steps done, history so far).

    Raises:
        CheckpointError: the checkpoint is a fine-tune of another encoder.
    """
    checkpoint = latest_checkpoint(root)

    def same_encoder(state: dict[str, Any]) -> None:
        if state.get("encoder_sha256") != encoder_sha:
            raise CheckpointError(
                f"{root} holds a fine-tune of another encoder (sha256 {state.get('encoder_sha256')}, "
                f"this one is {encoder_sha}); pass another --output-dir or delete it"
            )

    state = resume_latest(accelerator, checkpoint, check=same_encoder)
    if state is None:
        return 0, 0, []
    log.info("resuming fine-tuning from %s (epoch %d)", checkpoint, state["epoch"])
    return int(state["epoch"]), int(state["step"]), list(state["history"])
