"""The Objective interface every pretraining method implements.

The training loop only ever talks to this interface, so adding an objective is one new file plus one line
in :data:`sslvit.objectives.OBJECTIVES`. An objective composes the shared timm backbone (never subclasses it),
owns the schedules that belong to the method (EMA momentum, temperatures), and makes no Accelerator calls
and no device moves: the loop does those.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

# Parameters never decayed besides biases, norms and what timm models list in no_weight_decay(): objectives' tokens.
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


@dataclass(frozen=True)
class Progress:
    """Where training is: ``step`` optimisation steps are done, out of ``total_steps``.

    Schedules written in epochs read :attr:`epoch`, the fractional schedule epoch (as the official MAE code does
    per iteration), or :attr:`whole_epoch`, the epoch the step falls in (DINO's teacher temperature and frozen
    last layer, indexed by the integer epoch of its loop).
    """

    step: int
    total_steps: int
    epochs: int

    @property
    def epoch(self) -> float:
        return self.step / max(self.total_steps, 1) * self.epochs

    @property
    def whole_epoch(self) -> int:
        """``floor(step * epochs / total_steps)`` in integers: ``int(epoch)`` can land one epoch low on a boundary
        (29 / 100 * 100 = 28.999999999999996)."""
        return self.step * self.epochs // max(self.total_steps, 1)


class Objective(nn.Module, ABC):
    """A self-supervised objective around one shared timm encoder (a ViT, or for some objectives any timm model).

    Subclasses set ``name`` and ``Config`` (their config dataclass, which has a ``name`` field defaulting to
    ``name`` and a ``validate()`` method; ``--set objective.name=...`` builds it with its defaults) and implement
    :meth:`views`, :meth:`forward` and :meth:`encoder_for_export`. The hooks default to doing nothing;
    :meth:`make_optimizer` defaults to AdamW.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    # How the learning-rate warmup reaches the base rate. False: ``base * step / W`` (MAE's util/lr_sched.py, base
    # at step W); True: ``np.linspace(start, base, W)`` (DINO's utils.cosine_scheduler, base at step W - 1).
    warmup_reaches_base_at_last_step: ClassVar[bool] = False

    @classmethod
    def backbone_kwargs(cls, cfg: Any) -> dict[str, Any]:
        """Extra timm keyword arguments the objective needs in its backbone (kept in the export)."""
        return {}

    @abstractmethod
    def views(self) -> Callable[[Any], Any]:
        """The per-image training transform: PIL RGB image -> the view(s) :meth:`forward` expects."""

    @abstractmethod
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Compute the loss on a collated batch (``batch["views"]``) -> ``{"loss": ..., other scalars}``.

        Every value except ``"loss"`` must be detached; all are averaged and logged by the loop.
        """

    @abstractmethod
    def encoder_for_export(self) -> nn.Module:
        """The backbone users evaluate (MAE: the encoder; DINO: the teacher's backbone)."""

    def before_step(self, progress: Progress) -> None:
        """Set per-step schedule values before the forward pass (e.g. the teacher temperature)."""

    def after_backward(self, progress: Progress) -> None:
        """Edit gradients after backward, before clipping and the optimizer step (e.g. freeze a layer)."""

    def after_step(self, progress: Progress) -> dict[str, float]:
        """Update state after the optimizer step (e.g. EMA teacher); return schedule values to log."""
        return {}

    def visualize(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Images for TensorBoard, each ``(3, H, W)`` in [0, 1], computed on a fixed batch."""
        return {}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: no weight decay on biases, norms, tokens and position embeddings.

        Nor on what the timm models inside list in ``no_weight_decay()`` (e.g. Swin's relative position bias tables).
        """
        timm_names = {
            f"{prefix}.{name}"
            for prefix, module in self.named_modules()
            if prefix and callable(getattr(module, "no_weight_decay", None))
            for name in module.no_weight_decay()
        }
        names = [
            n
            for n, p in self.named_parameters()
            if p.requires_grad and (n.endswith(NO_DECAY_SUFFIXES) or n in timm_names)
        ]
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=names)

    def make_optimizer(self, lr: float, optim: Any) -> torch.optim.Optimizer:
        """The optimizer the loop steps; the default is AdamW over :meth:`param_groups`.

        Override it for another optimizer (SGD, LARS) or other groups. The loop sets every group's ``lr`` each step
        to the schedule's rate times the group's ``lr_scale`` (default 1), and the decayed groups' ``weight_decay``.

        Args:
            lr: the absolute learning rate (``optim.base_lr`` x global batch / 256).
            optim: the recipe's :class:`~sslvit.recipe.OptimConfig` (``weight_decay``, ``betas``, ...).
        """
        # fused=True: one kernel over all parameters; on a CPU the default per-parameter loop takes ~3x longer
        return torch.optim.AdamW(self.param_groups(optim.weight_decay), lr=lr, betas=optim.betas, fused=True)
