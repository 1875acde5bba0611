"""Linear probing of a frozen encoder: the MAE and the DINO protocol, with a grid of learning rates in one pass.

- MAE [0] (``main_linprobe.py``, facebookresearch/mae at 6a2ba402291005b003a70e99f7c87d1a2c376b0d): the CLS token
  after the final norm -> ``BatchNorm1d(affine=False, eps=1e-6)`` -> ``Linear`` (weights trunc-normal std 0.01,
  bias 0); LARS, momentum 0.9, no weight decay, base lr 0.1 per 256 images, batch 16384, 90 epochs: 10 of linear
  warmup then a half-cycle cosine, per iteration.
- DINO [1] (``eval_linear.py``, facebookresearch/dino): the CLS tokens of the last 4 blocks (each after the final
  norm) concatenated, optionally with the mean of the last block's patch tokens -> ``Linear`` (weights normal
  std 0.01, bias 0); SGD momentum 0.9, no weight decay, lr 0.001 x batch / 256, batch 1024, 100 epochs, cosine.

[0]: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021, https://arxiv.org/abs/2111.06377
[1]: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021, https://arxiv.org/abs/2104.14294

Deliberate deviations, each for running on any data with no tuning by hand:

- Default mode trains on cached features (no augmentation; ``augment=True`` is the papers' random-resized-crop +
  flip through the frozen encoder). The batch is the protocol's, but at most a power of two that leaves 10 steps per
  epoch (:func:`features_batch_size`): ImageNet keeps 16384 / 1024, a few thousand images get 128-512 instead of
  one step per epoch. The lr is scaled by the batch used; with LARS at small batches that makes the paper's
  base lr take tiny steps, so the MAE grid reaches up to 1000x it.
- A grid of base learning rates is trained as parallel heads on the same batches (each head has its own optimizer
  group); the head with the best top-1 on a held-out, class-balanced ``val_fraction`` of the training split is
  reported on the test split (the JSON says so). The paper's base lr is always in the grid.
- lightly's LARS skips the trust ratio whenever a group's weight decay is 0, while MAE's LARS applies it to every
  weight matrix with decay 0; so the weight goes in a group with a negligible decay (1e-12) that switches it on,
  and the bias in a plain momentum-SGD group, as in MAE (``p.ndim > 1``). Nesterov-style momentum, as MAE's.
- DINO steps its cosine once per epoch; here every schedule is per iteration (timm ``CosineLRScheduler``).
- DINO interleaves the CLS and avgpool features element-wise; here they are concatenated (same linear model).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from lightly.utils.lars import LARS
from timm.scheduler import CosineLRScheduler
from torch import nn
from torchvision import transforms as T

from sslvit.errors import RecipeError
from sslvit.evaluation.features import Features, balanced_subset, encode
from sslvit.training.schedules import scaled_lr
from sslvit.views import IMAGENET_NORMALIZE

log = logging.getLogger("sslvit.evaluation")

LARS_TRUST_ONLY_DECAY = 1e-12  # switches lightly's LARS trust ratio on without any real decay (see module doc)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "mae": {
        "epochs": 90,
        "warmup_epochs": 10.0,
        "batch_size": 16384,
        "base_lr": 0.1,
        "optimizer": "lars",
        "batchnorm": True,
        "lr_grid": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
    },
    "dino": {
        "epochs": 100,
        "warmup_epochs": 0.0,
        "batch_size": 1024,
        "base_lr": 0.001,
        "optimizer": "sgd",
        "batchnorm": False,
        "lr_grid": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    },
}


@dataclass
class LinearConfig:
    """A linear probe. None means "the protocol's value" (see :data:`PROTOCOLS`)."""

    protocol: Literal["mae", "dino"] = "mae"
    epochs: int | None = None
    warmup_epochs: float | None = None
    batch_size: int | None = None  # features mode, see features_batch_size; augment mode: --batch-size x processes
    lr_grid: str = ""  # comma-separated base lrs per 256 images; "" = the protocol's grid
    momentum: float = 0.9
    weight_decay: float = 0.0
    n_last_blocks: int = 4  # dino: CLS of the last n blocks (at most 4 are cached)
    avgpool_patch_tokens: bool = False  # dino: also the mean of the last block's patch tokens
    val_fraction: float = 0.1  # held out of the training split to pick the learning rate
    augment: bool = False  # the papers' random-resized-crop + flip through the frozen encoder
    seed: int = 0

    def validate(self) -> None:
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 1):
            raise RecipeError("epochs and batch_size must be positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise RecipeError(f"val_fraction={self.val_fraction} must be between 0 and 1")
        if not 1 <= self.n_last_blocks <= 4:
            raise RecipeError(f"n_last_blocks={self.n_last_blocks} must be between 1 and 4 (4 are cached)")
        self.grid()

    def grid(self) -> list[float]:
        """The base learning rates to train, as parallel heads."""
        if not self.lr_grid:
            return list(PROTOCOLS[self.protocol]["lr_grid"])
        try:
            values = [float(v) for v in self.lr_grid.split(",") if v.strip()]
        except ValueError:
            raise RecipeError(f"lr_grid={self.lr_grid!r} must be comma-separated numbers, e.g. 0.03,0.1,0.3") from None
        if not values or min(values) <= 0:
            raise RecipeError(f"lr_grid={self.lr_grid!r} must hold positive learning rates")
        return values

    def resolved(self) -> dict[str, Any]:
        """Every hyperparameter, the protocol's defaults filled in (what the JSON records)."""
        defaults = PROTOCOLS[self.protocol]
        out = {**dataclasses.asdict(self), **{k: v for k, v in defaults.items() if k not in ("lr_grid",)}}
        for key in ("epochs", "warmup_epochs", "batch_size"):
            out[key] = getattr(self, key) if getattr(self, key) is not None else defaults[key]
        out["lr_grid"] = self.grid()
        out["feature"] = (
            "cls"
            if self.protocol == "mae"
            else f"cls of last {self.n_last_blocks} blocks" + (" + mean patch token" * self.avgpool_patch_tokens)
        )
        return out


def augment_transform(img_size: int) -> T.Compose:
    """Both papers' linear-probe augmentation: random-resized crop (scale 0.08-1, bicubic) and horizontal flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(**IMAGENET_NORMALIZE),
        ]
    )


def probe_inputs(feats: Features | dict[str, torch.Tensor], cfg: LinearConfig) -> torch.Tensor:
    """The head's input: ``(N, D)`` CLS (MAE), or ``(N, n*D [+ D])`` last-n CLS [+ mean patch token] (DINO)."""
    get = feats.get if isinstance(feats, dict) else lambda k: getattr(feats, k)
    if cfg.protocol == "mae":
        return get("cls")
    blocks = get("cls_blocks")
    parts = [blocks[:, -cfg.n_last_blocks :].flatten(1)] + ([get("patch_mean")] if cfg.avgpool_patch_tokens else [])
    return torch.cat(parts, dim=1)


class LinearHeads(nn.Module):
    """``count`` independent linear classifiers on the same input, one per learning rate of the grid.

    Head ``i`` is ``BatchNorm1d(dim, affine=False, eps=1e-6) -> Linear`` (MAE) or ``Linear`` (DINO). The norm has no
    parameters and every head sees the same batches, so one norm serves all heads exactly; the linears run as one
    batched matmul, but each keeps its own parameters (and so its own LARS trust ratio and learning rate).
    """

    def __init__(self, dim: int, num_classes: int, count: int, batchnorm: bool):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.linears = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(count))
        for linear in self.linears:
            init = nn.init.trunc_normal_ if batchnorm else nn.init.normal_  # MAE: trunc-normal, DINO: normal
            init(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)

    def __len__(self) -> int:
        return len(self.linears)

    def head(self, i: int) -> nn.Module:
        """Head ``i`` as a standalone classifier of ``(B, dim)`` features."""
        return nn.Sequential(self.norm, self.linears[i]) if isinstance(self.norm, nn.BatchNorm1d) else self.linears[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, dim)`` -> logits ``(count, B, num_classes)``."""
        weight = torch.stack([linear.weight for linear in self.linears])  # (count, classes, dim)
        bias = torch.stack([linear.bias for linear in self.linears])  # (count, classes)
        return torch.einsum("bd,kcd->kbc", self.norm(x), weight) + bias[:, None]


def make_optimizer(heads: LinearHeads, lrs: list[float], hp: dict[str, Any]) -> torch.optim.Optimizer:
    """LARS (MAE) or SGD (DINO) with one parameter group per head's weight and bias, each at its own lr."""
    groups = []
    for i, lr in enumerate(lrs):
        linear = heads.linears[i]
        weight_decay = hp["weight_decay"] or (LARS_TRUST_ONLY_DECAY if hp["optimizer"] == "lars" else 0.0)
        groups += [
            {"params": [linear.weight], "lr": lr, "weight_decay": weight_decay},
            {"params": [linear.bias], "lr": lr, "weight_decay": 0.0},
        ]
    if hp["optimizer"] == "lars":
        return LARS(groups, lr=lrs[0], momentum=hp["momentum"], nesterov=True)
    return torch.optim.SGD(groups, lr=lrs[0], momentum=hp["momentum"])


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> CosineLRScheduler:
    """Linear warmup from 0, then a half-cycle cosine to 0, per iteration, for every group from its own lr."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=0.0,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def heads_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: heads share no parameters, so gradients stay separate."""
    count, batch, classes = logits.shape
    return nn.functional.cross_entropy(logits.reshape(-1, classes), labels.repeat(count)) * count


@torch.no_grad()
def head_accuracy(heads: LinearHeads, x: torch.Tensor, y: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """``(count, 2)`` top-1 and top-5 accuracy (%) of every head on ``x: (N, dim)``, ``y: (N,)``."""
    heads.eval()
    hits = torch.zeros(len(heads), 2)
    for start in range(0, len(x), batch):
        logits = heads(x[start : start + batch])
        ranked = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (count, B, 5)
        match = ranked.eq(y[start : start + batch].view(1, -1, 1))
        hits += torch.stack([match[..., 0].sum(1), match.any(-1).sum(1)], dim=1).float().cpu()
    heads.train()
    return 100.0 * hits / max(len(x), 1)


def features_batch_size(n: int, protocol_batch: int, min_steps_per_epoch: int = 10) -> int:
    """The protocol's batch, or the largest power of two leaving ``min_steps_per_epoch`` steps (at least 16 or n)."""
    fit = 2 ** int(math.floor(math.log2(max(n / min_steps_per_epoch, 1))))
    return min(protocol_batch, max(fit, 16), n)


def train_on_features(heads: LinearHeads, x: torch.Tensor, y: torch.Tensor, hp: dict[str, Any]) -> dict[str, Any]:
    """Train every head on fixed features ``x: (N, dim)``, labels ``y: (N,)`` (one process).

    Returns:
        the batch size, learning rates and number of steps actually used.
    """
    batch = features_batch_size(len(x), hp["batch_size"])
    steps_per_epoch = len(x) // batch
    lrs = [scaled_lr(base, batch) for base in hp["lr_grid"]]
    optimizer = make_optimizer(heads, lrs, hp)
    total = steps_per_epoch * hp["epochs"]
    scheduler = make_scheduler(optimizer, total, round(steps_per_epoch * hp["warmup_epochs"]))
    generator = torch.Generator().manual_seed(hp["seed"])
    heads.train()
    step = 0
    for _ in range(hp["epochs"]):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(steps_per_epoch):  # drop_last, as both papers' loaders
            rows = order[i * batch : (i + 1) * batch]
            scheduler.step_update(step)
            loss = heads_loss(heads(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    if not math.isfinite(loss.item()):
        log.warning("a linear head diverged (loss %s); the grid's smaller learning rates still count", loss.item())
    return {"batch_size_used": batch, "lrs": lrs, "steps": total}


def train_augmented(
    heads: LinearHeads, encoder: nn.Module, loader: Any, hp: dict[str, Any], cfg: LinearConfig, accelerator: Any
) -> dict[str, Any]:
    """Train every head on random-resized-crop + flip views through the frozen encoder (all processes).

    ``loader`` yields ``collate_skipping`` batches of augmented images; ``heads`` and the optimizer go through
    ``accelerator.prepare`` here, so the heads are averaged over processes (DDP).
    """
    batch = loader.batch_size * accelerator.num_processes
    lrs = [scaled_lr(base, batch) for base in hp["lr_grid"]]
    optimizer = make_optimizer(heads, lrs, hp)
    model, optimizer, loader = accelerator.prepare(heads, optimizer, loader)
    total = len(loader) * hp["epochs"]
    scheduler = make_scheduler(optimizer, total, round(len(loader) * hp["warmup_epochs"]))
    encoder.eval().requires_grad_(False).to(accelerator.device)
    step = 0
    for epoch in range(hp["epochs"]):
        loader.set_epoch(epoch)
        for data in loader:
            if data["views"] is None:
                continue
            scheduler.step_update(step)
            with accelerator.autocast():
                inputs = probe_inputs(encode(encoder, data["views"]), cfg).float()
                loss = heads_loss(model(inputs), data["labels"])
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
    return {"batch_size_used": batch, "lrs": lrs, "steps": step}


def split_train_val(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions of a class-balanced held-out ``fraction`` of the training features, and of the rest."""
    labels_np = labels.numpy()
    n_classes = len(np.unique(labels_np))
    val = balanced_subset(labels_np, max(n_classes, round(fraction * len(labels_np))), seed)
    train = np.setdiff1d(np.arange(len(labels_np)), val)
    return torch.from_numpy(train), torch.from_numpy(val)


def linear_probe(
    train: Features,
    test: Features,
    num_classes: int,
    cfg: LinearConfig,
    augmented: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train the grid of heads, pick the best on the held-out part of ``train``, report it on ``test``.

    Args:
        train, test: cached features of the two splits.
        augmented: with ``cfg.augment``: ``{"encoder", "loader_for": record indices -> loader, "accelerator"}``.
        device: where heads train on features (one process); augment mode uses the accelerator's device.

    Returns:
        ``hyperparameters``, ``metrics`` (``top1``/``top5`` of the chosen head on the test split), ``selection``
        (how the head was chosen, with every head's val and test top-1) and the trained ``heads``.
    """
    cfg.validate()
    hp = cfg.resolved()
    train_rows, val_rows = split_train_val(train.labels, cfg.val_fraction, cfg.seed)
    x_train, y_train = probe_inputs(train, cfg).to(device), train.labels.to(device)
    torch.manual_seed(cfg.seed)
    heads = LinearHeads(x_train.shape[1], num_classes, len(hp["lr_grid"]), hp["batchnorm"]).to(device)
    if cfg.augment:
        accelerator = augmented["accelerator"]
        used = train_augmented(
            heads, augmented["encoder"], augmented["loader_for"](train.indices[train_rows]), hp, cfg, accelerator
        )
        heads = accelerator.unwrap_model(heads).to(device)
    else:
        used = train_on_features(heads, x_train[train_rows.to(device)], y_train[train_rows.to(device)], hp)
    val_acc = head_accuracy(heads, x_train[val_rows.to(device)], y_train[val_rows.to(device)])
    test_acc = head_accuracy(heads, probe_inputs(test, cfg).to(device), test.labels.to(device))
    best = int(val_acc[:, 0].argmax())
    selection = {
        "rule": f"head with the best top-1 on a class-balanced held-out {cfg.val_fraction:.0%} of the training split "
        f"({len(val_rows)} images, not trained on); its top-1/top-5 on the test split are the metrics",
        "chosen_base_lr": hp["lr_grid"][best],
        "grid": [
            {"base_lr": b, "lr": lr, "val_top1": float(v[0]), "test_top1": float(t[0])}
            for b, lr, v, t in zip(hp["lr_grid"], used["lrs"], val_acc, test_acc)
        ],
    }
    metrics = {"top1": float(test_acc[best, 0]), "top5": float(test_acc[best, 1]), "val_top1": float(val_acc[best, 0])}
    hp.update(used, train_size=len(train_rows), val_size=len(val_rows), input_dim=x_train.shape[1])
    return {"hyperparameters": hp, "metrics": metrics, "selection": selection, "heads": heads}
