"""Augmentation on tensors: ``data.augment_on=worker|device``.

An objective declares its views once, as an :class:`Augmentation` (one :class:`ViewSpec` per crop). With
``augment_on=worker`` the objective's own PIL transform runs in the loader workers (``views()``, as before). With
``augment_on=device`` the workers only decode, shrink an image whose longer side exceeds :attr:`Augmentation.bound`,
and draw every per-sample parameter (crop box, flip, colour-jitter factors and order, grayscale, blur sigma,
solarisation) from the same per-sample RNG keyed by (seed, epoch, index) (:mod:`sslvit.data.seeding`); the loop
then renders all views of the batch on the batch's device with batched tensor ops (:meth:`DeviceViews.on_device`).
Parameters are drawn with torchvision's own ``RandomResizedCrop.get_params`` and ``ColorJitter.get_params``, so the
distributions are torchvision's; the draws are per sample, so exact resume holds as on the PIL path.

Differences from the PIL path, within the tolerances tests/test_augment.py checks: crops are bilinear
(``roi_align``, adaptive sampling) where the PIL path is bicubic, and colour ops run in float, not uint8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torchvision.transforms as T
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import roi_align
from torchvision.transforms.functional import pil_to_tensor

from sslvit.errors import RecipeError

if TYPE_CHECKING:
    from sslvit.recipe import DataConfig

AUGMENT_ON = ("auto", "worker", "device")
# one row of parameters per (sample, view): crop box (x1, y1, x2, y2), flip, jitter on, 4 factors, 4-op order,
# grayscale, blur sigma (0 = none), solarise
X1, Y1, X2, Y2, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, ORDER, GRAY, SIGMA, SOLAR = (*range(10), 10, 14, 15, 16)
N_PARAMS = 17
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's "L" conversion


@dataclass(frozen=True)
class ViewSpec:
    """One crop: RandomResizedCrop to ``size`` then flip, colour jitter, grayscale, blur, solarise (each per sample)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    jitter_prob: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    gray_prob: float = 0.0
    blur_prob: float = 0.0
    sigmas: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0


@dataclass(frozen=True)
class Augmentation:
    """An objective's views, in order, with the normalisation that ends each of them."""

    views: tuple[ViewSpec, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def bound(self) -> int:
        """The longest image side the workers send: twice the largest crop (smaller images travel as they are)."""
        return 2 * max(v.size for v in self.views)


class RawViews(NamedTuple):
    """What a worker sends with ``augment_on=device``: uint8 pixels (zero-padded in a batch) and per-view params."""

    pixels: Tensor  # (3, H, W) per sample; (B, 3, H, W) batched
    params: Tensor  # (V, N_PARAMS) per sample; (B, V, N_PARAMS) batched

    def to(self, device: torch.device | str) -> RawViews:
        return RawViews(self.pixels.to(device), self.params.to(device))


def resolve(augment_on: str) -> str:
    """``auto`` -> ``device``, on a CPU too: the batched path costs less CPU per image than PIL there (DINO's
    2 + 2 crops 1.8 ms against 3.3 ms, MAE's crop 0.28 against 0.63) and lifted DINO's end-to-end throughput at the
    CIFAR config from 0.79x to 1.05x the bare step (docs/data.md). An objective without a tensor path falls back
    to its PIL views in :func:`views_for`."""
    return "device" if augment_on == "auto" else augment_on


def views_for(objective: Any, cfg: DataConfig) -> Callable[[Image.Image], Any]:
    """The per-image transform the loader workers run: the objective's PIL views, or :class:`DeviceViews`."""
    where = resolve(cfg.augment_on)
    spec = getattr(objective, "augmentation", None)
    if where == "worker":
        return objective.views()
    if spec is None:
        if cfg.augment_on == "device":
            raise RecipeError(
                f"data.augment_on=device: objective {type(objective).__name__} has no tensor augmentation; "
                "set data.augment_on=worker"
            )
        return objective.views()
    return DeviceViews(spec())


class DeviceViews:
    """Worker half (``__call__``: decode-side resize + parameter draws) and device half (:meth:`on_device`)."""

    def __init__(self, spec: Augmentation):
        self.spec = spec

    def __call__(self, image: Image.Image) -> RawViews:
        longest = max(image.size)
        if longest > self.spec.bound:
            w, h = image.size
            image = image.resize(
                (max(1, round(w * self.spec.bound / longest)), max(1, round(h * self.spec.bound / longest))),
                Image.BILINEAR,
            )
        params = torch.stack([draw(image, view) for view in self.spec.views])
        return RawViews(pil_to_tensor(image), params)

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Replace ``batch['views']`` (a batched :class:`RawViews`) by the list of rendered views."""
        raw = batch["views"]
        if not isinstance(raw, RawViews):
            return batch
        pixels = raw.pixels.float().div_(255)
        views = [render(pixels, raw.params[:, v].to(pixels.device), view) for v, view in enumerate(self.spec.views)]
        mean = torch.tensor(self.spec.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=pixels.device).view(1, 3, 1, 1)
        return {**batch, "views": [(view - mean) / std for view in views]}


def render_on_device(dataset: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its views rendered, when ``dataset`` makes them on the device (``data.augment_on=device``);
    otherwise ``batch`` unchanged (the workers made them). The loop and the fixed visualisation batch both use it."""
    transform = getattr(dataset, "transform", None)
    return transform.on_device(batch) if isinstance(transform, DeviceViews) else batch


def collate_raw(items: list[RawViews]) -> RawViews:
    """Stack worker outputs, zero-padding pixels to the batch's largest height and width (boxes stay valid)."""
    height = max(item.pixels.shape[1] for item in items)
    width = max(item.pixels.shape[2] for item in items)
    pixels = torch.zeros((len(items), 3, height, width), dtype=torch.uint8)
    for k, item in enumerate(items):
        pixels[k, :, : item.pixels.shape[1], : item.pixels.shape[2]] = item.pixels
    return RawViews(pixels, torch.stack([item.params for item in items]))


def draw(image: Image.Image, view: ViewSpec) -> Tensor:
    """One view's parameters for one image, from the torch RNG (which the loader seeds per sample)."""
    p = torch.zeros(N_PARAMS)
    top, left, h, w = T.RandomResizedCrop.get_params(image, list(view.scale), list(view.ratio))
    p[X1 : Y2 + 1] = torch.tensor([left, top, left + w, top + h], dtype=torch.float)
    p[FLIP] = float(torch.rand(1).item() < view.hflip_prob)
    if torch.rand(1).item() < view.jitter_prob:
        b, c, s, hue = view.jitter
        order, fb, fc, fs, fh = T.ColorJitter.get_params(
            [max(0.0, 1 - b), 1 + b], [max(0.0, 1 - c), 1 + c], [max(0.0, 1 - s), 1 + s], [-hue, hue]
        )
        p[JITTER] = 1.0
        p[BRIGHT : HUE + 1] = torch.tensor([fb, fc, fs, fh], dtype=torch.float)
        p[ORDER : ORDER + 4] = order.float()
    p[GRAY] = float(torch.rand(1).item() < view.gray_prob)
    if torch.rand(1).item() < view.blur_prob:
        p[SIGMA] = float(torch.empty(1).uniform_(*view.sigmas).item())
    p[SOLAR] = float(torch.rand(1).item() < view.solarize_prob)
    return p


def render(pixels: Tensor, p: Tensor, view: ViewSpec) -> Tensor:
    """``(B, 3, H, W)`` floats in [0, 1] and ``(B, N_PARAMS)`` -> ``(B, 3, size, size)`` in [0, 1], batched."""
    n = pixels.shape[0]
    boxes = torch.cat([torch.arange(n, device=pixels.device, dtype=p.dtype)[:, None], p[:, X1 : Y2 + 1]], 1)
    x = roi_align(pixels, boxes, (view.size, view.size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    x = x.mul_(255).round_().div_(255).clamp_(0, 1)  # the PIL path holds uint8 after the crop
    x = torch.where(p[:, FLIP, None, None, None] > 0.5, x.flip(-1), x)
    if view.jitter_prob > 0:
        x = _jitter(x, p)
    if view.gray_prob > 0:
        x = _subset(x, p[:, GRAY] > 0.5, lambda y, q: _gray(y).expand_as(y), p)
    if view.blur_prob > 0:
        x = _subset(x, p[:, SIGMA] > 0, lambda y, q: _blur(y, q[:, SIGMA]), p)
    if view.solarize_prob > 0:
        x = torch.where((p[:, SOLAR, None, None, None] > 0.5) & (x >= 127.5 / 255), 1 - x, x)
    return x


def _subset(x: Tensor, mask: Tensor, op: Callable[[Tensor, Tensor], Tensor], p: Tensor) -> Tensor:
    """Apply ``op(x[mask], p[mask])`` to the masked samples only."""
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return x
    x = x.clone()
    x[idx] = op(x[idx], p[idx])
    return x


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def _jitter(x: Tensor, p: Tensor) -> Tensor:
    """torchvision's ColorJitter with per-sample factors and per-sample op order (order[k] = op at position k)."""
    ops: list[Callable[[Tensor, Tensor], Tensor]] = [
        lambda y, q: (y * q[:, BRIGHT].view(-1, 1, 1, 1)).clamp(0, 1),
        lambda y, q: _blend(y, _gray(y).mean((1, 2, 3), keepdim=True), q[:, CONTRAST]),
        lambda y, q: _blend(y, _gray(y), q[:, SAT]),
        lambda y, q: _shift_hue(y, q[:, HUE]),
    ]
    on = p[:, JITTER] > 0.5
    for position in range(4):
        for k, op in enumerate(ops):
            x = _subset(x, on & (p[:, ORDER + position] == k), op, p)
    return x


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """RGB -> HSV, hue += shift (mod 1), -> RGB (the textbook hexcone formulas)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1
    i = torch.floor(h * 6)
    f = h * 6 - i
    i = i.long() % 6
    v = maxc
    pp, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    pick = lambda *c: torch.stack(c).gather(0, i[None])[0]  # noqa: E731
    return torch.stack([pick(v, q, pp, pp, t, v), pick(t, v, v, q, pp, pp), pick(pp, pp, t, v, v, q)], 1)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma (radius 3 sigma of the largest), reflect padding."""
    radius = max(1, min(math.ceil(3 * float(sigma.max())), x.shape[-1] - 1, x.shape[-2] - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B * 3, 2r + 1)
    n, c, hh, ww = x.shape
    y = x.reshape(1, n * c, hh, ww)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hh, ww)
