"""facebookresearch/dino, restated: the head, loss, multi-crop forward, teacher update and schedules of DINO.

Source: https://github.com/facebookresearch/dino at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a
- main_dino.py: ``DINOLoss`` (its teacher-temperature schedule, ``forward``, ``update_center``) and the teacher's
  EMA update inside ``train_one_epoch`` (here :func:`ema_update_teacher`);
- utils.py: ``cosine_scheduler``, ``cancel_gradients_last_layer``, ``MultiCropWrapper``;
- vision_transformer.py: ``DINOHead``.
(These parts are unchanged since the commits sslvit's docstrings cite: main_dino.py cc72fe98, utils.py ba9edd18,
vision_transformer.py 58aabc09 for ``DINOHead``.)

This is an independent restatement in our own words (the authors' code is not copied here): the same function
boundaries, argument order and order of floating-point operations, so that a comparison with sslvit is meaningful.
It imports nothing from sslvit.

Environment shims (the math is untouched):
1. One process: ``dist.all_reduce`` in ``update_center`` is the identity and ``dist.get_world_size()`` is 1.
   (Several processes' outputs of equal batch size give the centre of their concatenation.)
2. ``DINOHead`` initialises its linear layers with timm's ``trunc_normal_`` (std 0.02), the same truncated normal
   as the authors' ``utils.trunc_normal_``; the tests overwrite these weights with sslvit's anyway.
3. ``nn.utils.weight_norm`` is deprecated in recent torch; the authors' call is kept (its ``weight_g`` /
   ``weight_v`` parameters are the authors' names) and only its FutureWarning is silenced.
4. No ``.cuda()``, DDP or fp16 autocast: everything runs on the CPU in float32.
5. ``MultiCropWrapper`` wraps whatever backbone it is given; the tests give it a timm ViT, the backbone sslvit
   uses (a deliberate deviation from the authors' own ViT, listed in sslvit/objectives/dino.py), so the comparison
   covers the wrapper, head, loss, teacher update and schedules, not the authors' ViT.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

# --- utils.py -------------------------------------------------------------------------------------------------------


def cosine_scheduler(
    base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:  # fmt: skip
    """One value per iteration: ``np.linspace(start_warmup_value, base_value, W)`` over the ``W`` warmup
    iterations, then ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` for ``i = 0 .. n - 1``."""
    warmup = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Before epoch ``freeze_last_layer``, drop the gradients of every parameter named ``*last_layer*``."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


class MultiCropWrapper(nn.Module):
    """One backbone forward per run of consecutive crops of equal width, the head on all features at once."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # no classification layers
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        if not isinstance(x, list):
            x = [x]
        widths = torch.tensor([crop.shape[-1] for crop in x])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start, features = 0, torch.empty(0).to(x[0].device)
        for end in ends:
            out = self.backbone(torch.cat(x[start:end]))
            if isinstance(out, tuple):  # XCiT returns a tuple
                out = out[0]
            features = torch.cat((features, out))
            start = end
        return self.head(features)


# --- vision_transformer.py ------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """MLP (GELU, optional BatchNorm) to a bottleneck, L2 normalisation, weight-normalised linear layer."""

    def __init__(
        self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True, nlayers: int = 3,
        hidden_dim: int = 2048, bottleneck_dim: int = 256,
    ) -> None:  # fmt: skip
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        with warnings.catch_warnings():  # shim 3
            warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)  # shim 2
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# --- main_dino.py ---------------------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher softmax and the student softmax, over crop pairs."""

    def __init__(
        self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
        warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1, center_momentum: float = 0.9,
    ) -> None:  # fmt: skip
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # the teacher temperature, per epoch: a linear warmup, then constant
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        """``student_output: (ncrops * B, K)``, ``teacher_output: (2 * B, K)``, crop-major; moves the centre."""
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:  # a crop is not compared with itself
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the batch mean of the teacher outputs (shim 1: one process)."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world_size = 1  # dist.all_reduce(batch_center) is the identity in one process
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def ema_update_teacher(student: nn.Module, teacher: nn.Module, m: float) -> None:
    """train_one_epoch's "EMA update for the teacher": ``param_k = param_k * m + (1 - m) * param_q``, in place,
    over the student's and teacher's parameters in order (``m`` is ``momentum_schedule[it]``)."""
    with torch.no_grad():
        pairs: Iterable[tuple[Tensor, Tensor]] = zip(student.parameters(), teacher.parameters())
        for param_q, param_k in pairs:
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
