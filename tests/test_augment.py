"""data.augment_on=device: the tensor views draw what the PIL views draw, render the same pixels, and resume exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import ks_2samp

from sslvit.data import augment
from sslvit.data.augment import Augmentation, DeviceViews, RawViews, ViewSpec, collate_raw, draw, render
from sslvit.errors import RecipeError
from sslvit.train import pretrain
from sslvit.training.pretrain import build_objective
from tests.conftest import tiny_recipe

TINY_DINO = ["objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
             "objective.local_crops_number=2"]  # fmt: skip
SAMPLES = 3000


def _colourful(height: int = 40, width: int = 48) -> Image.Image:
    """A smooth, saturated test image: interpolation differs little, colour ops have something to move."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 5.0 + y / 7.0)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def dino():
    official_views = ["objective.hflip_prob=0.5", "objective.blur_probs=[1.0,0.1,0.5]",
                      "objective.solarization_prob=0.2"]  # fmt: skip
    objective, _ = build_objective(tiny_recipe("quickstart_dino", *TINY_DINO, *official_views))  # DINO's own views
    return objective


def _pil_views(dino) -> list:
    return [view.transform.transforms for view in dino.views().transforms]  # lightly: one Compose per crop


def test_the_spec_carries_the_pil_paths_probabilities_and_crop_ranges(dino):
    spec = dino.augmentation()
    for pil, view in zip(_pil_views(dino), spec.views, strict=True):
        crop, flip, _, jitter, gray, blur, solarize = pil[0], pil[1], pil[2], pil[4], pil[5], pil[6], pil[7]
        assert (view.size, view.scale, view.ratio) == (crop.size[0], tuple(crop.scale), tuple(crop.ratio))
        assert (view.hflip_prob, view.jitter_prob, view.gray_prob) == (flip.p, jitter.p, gray.p)
        cj = jitter.transforms[0]
        assert view.jitter == pytest.approx((cj.brightness[1] - 1, cj.contrast[1] - 1, cj.saturation[1] - 1, cj.hue[1]))
        assert (view.blur_prob, view.sigmas, view.solarize_prob) == (blur.prob, tuple(blur.sigmas), solarize.prob)
    assert len(spec.views) == 2 + 2 and spec.views[1].solarize_prob > 0 and spec.views[0].solarize_prob == 0


def test_drawn_crop_scales_aspect_ratios_and_rates_match_the_pil_path(monkeypatch):
    image = _colourful()
    view = ViewSpec(16, (0.05, 0.4), jitter_prob=0.8, jitter=(0.4, 0.4, 0.2, 0.1), gray_prob=0.2, blur_prob=0.5,
                    solarize_prob=0.2)  # fmt: skip
    pil_boxes, original = [], T.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        box = original(img, scale, ratio)
        pil_boxes.append(box[2:])
        return box

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording))
    crop = T.RandomResizedCrop(16, scale=view.scale)
    torch.manual_seed(0)
    for _ in range(SAMPLES):
        crop(image)
    monkeypatch.undo()
    torch.manual_seed(1)
    params = torch.stack([draw(image, view) for _ in range(SAMPLES)])
    w, h = params[:, augment.X2] - params[:, augment.X1], params[:, augment.Y2] - params[:, augment.Y1]
    pil = torch.tensor(pil_boxes, dtype=torch.float)  # (h, w)
    area = image.width * image.height
    assert ks_2samp((w * h / area).numpy(), (pil[:, 0] * pil[:, 1] / area).numpy()).pvalue > 1e-3
    assert ks_2samp((w / h).log().numpy(), (pil[:, 1] / pil[:, 0]).log().numpy()).pvalue > 1e-3
    assert ((w * h / area) >= 0.04).all() and (params[:, augment.X2] <= image.width).all()  # rounded boxes
    rates = {augment.FLIP: 0.5, augment.JITTER: 0.8, augment.GRAY: 0.2, augment.SOLAR: 0.2}
    for column, p in rates.items():  # 4 standard errors at 3000 samples: < 0.04
        assert params[:, column].mean().item() == pytest.approx(p, abs=4 * (p * (1 - p) / SAMPLES) ** 0.5)
    blurred = params[:, augment.SIGMA][params[:, augment.SIGMA] > 0]
    assert blurred.numel() / SAMPLES == pytest.approx(0.5, abs=0.04)
    assert blurred.min() >= 0.1 and blurred.max() <= 2.0 and blurred.mean().item() == pytest.approx(1.05, abs=0.05)
    jittered = params[params[:, augment.JITTER] > 0]
    assert jittered[:, augment.BRIGHT].min() >= 0.6 and jittered[:, augment.BRIGHT].max() <= 1.4
    orders = jittered[:, augment.ORDER : augment.ORDER + 4]
    assert (orders.sort(1).values == torch.arange(4.0)).all() and orders[:, 0].std() > 0.5  # permutations, varied


def test_a_fixed_crop_box_gives_the_pil_crops_pixels_within_interpolation_tolerance():
    image = _colourful()
    pixels = TF.pil_to_tensor(image)[None].float() / 255
    for (left, top, w, h), size in [((5, 7, 24, 20), 32), ((2, 1, 40, 36), 16)]:  # upsampled, downsampled
        p = torch.zeros(1, augment.N_PARAMS)
        p[0, :4] = torch.tensor([left, top, left + w, top + h], dtype=torch.float)
        ours = render(pixels, p, ViewSpec(size, (1.0, 1.0)))[0]
        theirs = TF.pil_to_tensor(image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
        diff = (ours - theirs.float() / 255).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.08, (diff.mean(), diff.max())


def test_batched_colour_ops_match_torchvisions_per_image_ops():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 12, 12)
    p = torch.zeros(6, augment.N_PARAMS)
    p[:, augment.JITTER] = 1
    p[:, augment.BRIGHT : augment.HUE + 1] = torch.tensor([[0.7, 1.3, 0.9, 0.08]]).repeat(6, 1)
    p[:, augment.HUE] = torch.linspace(-0.1, 0.1, 6)
    for k in range(6):
        p[k, augment.ORDER : augment.ORDER + 4] = torch.randperm(4).float()
    ours = augment._jitter(x, p)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(6):
        y = x[k]
        for op in p[k, augment.ORDER : augment.ORDER + 4].long().tolist():
            y = ops[op](y, float(p[k, augment.BRIGHT + op]))
        torch.testing.assert_close(ours[k], y, atol=2e-5, rtol=0)


def test_colour_statistics_of_the_views_match_the_pil_path(dino):
    image, pil, device = _colourful(32, 32), dino.views(), DeviceViews(dino.augmentation())
    torch.manual_seed(0)
    theirs = [torch.stack(pil(image)[:2]) for _ in range(400)]  # the 2 global crops (solarisation in the second)
    raw = collate_raw([device(image) for _ in range(400)])
    ours = torch.stack(device.on_device({"views": raw})["views"][:2], 1)
    theirs = torch.stack(theirs)  # (N, 2, 3, H, W)
    for view in range(2):
        a, b = ours[:, view], theirs[:, view]
        spread_a, spread_b = a.mean((2, 3)).std(0), b.mean((2, 3)).std(0)  # per-sample colour spread (C,)
        standard_error = ((spread_a**2 + spread_b**2) / a.shape[0]).sqrt()
        assert ((a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs() < 4 * standard_error).all()
        torch.testing.assert_close(spread_a, spread_b, atol=0.08, rtol=0.1)
        torch.testing.assert_close(a.std((0, 2, 3)), b.std((0, 2, 3)), atol=0.08, rtol=0.1)


def test_images_of_different_sizes_are_bounded_and_padded_into_one_batch():
    device = DeviceViews(Augmentation((ViewSpec(8, (0.5, 1.0)),), (0.0,) * 3, (1.0,) * 3))
    small, large = device(_colourful(10, 12)), device(_colourful(40, 60))
    assert small.pixels.shape == (3, 10, 12) and large.pixels.shape == (3, 11, 16)  # longest side <= 2 * 8
    batch = collate_raw([small, large])
    assert batch.pixels.shape == (2, 3, 11, 16) and batch.params.shape == (2, 1, augment.N_PARAMS)
    assert (batch.params[0, 0, augment.X2] <= 12).item()  # the box stays inside the unpadded image
    views = device.on_device({"views": batch, "labels": torch.zeros(2)})["views"]
    assert isinstance(batch, RawViews) and views[0].shape == (2, 3, 8, 8)


def test_bad_values_and_objectives_without_tensor_views_are_recipe_errors():
    with pytest.raises(RecipeError, match="data.augment_on must be auto, worker or device"):
        tiny_recipe("quickstart_dino", "data.augment_on=gpu")
    recipe = tiny_recipe("quickstart_mocov3", "data.augment_on=device")
    objective, _ = build_objective(recipe)
    with pytest.raises(RecipeError, match="data.augment_on=device: objective"):
        augment.views_for(objective, recipe.data)
    assert augment.resolve("auto") == "device"  # on every device: measured on a CPU, the default on a GPU


def test_a_device_augmented_run_resumes_bit_identically(tmp_path, monkeypatch, one_thread):
    rendered = []
    on_device = DeviceViews.on_device
    monkeypatch.setattr(DeviceViews, "on_device", lambda self, batch: rendered.append(1) or on_device(self, batch))
    recipe = tiny_recipe("quickstart_dino", *TINY_DINO, "data.augment_on=device", "train.checkpoint_every=2",
                         "train.max_steps=4")  # fmt: skip
    pretrain(recipe, tmp_path / "straight")
    assert len(rendered) == 4 + 1  # the 4 steps and the fixed visualisation batch
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_00000004")  # as if killed after step 2's save
    shutil.rmtree(tmp_path / "resumed" / "encoder")
    pretrain(recipe, tmp_path / "resumed")
    assert len(rendered) == 5 + 2 + 1
    straight = load_file(str(tmp_path / "straight" / "encoder" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "encoder" / "model.safetensors"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_mae_declares_its_pil_crop_and_flip_for_the_device_path():
    objective, _ = build_objective(tiny_recipe("quickstart"))
    crop, flip = objective.views().transform.transforms[:2]
    (view,) = objective.augmentation().views
    assert (view.size, view.scale, view.hflip_prob) == (crop.size[0], tuple(crop.scale), flip.p)
    assert view.jitter_prob == view.gray_prob == view.blur_prob == view.solarize_prob == 0
    device = DeviceViews(objective.augmentation())
    (images,) = device.on_device({"views": collate_raw([device(_colourful()) for _ in range(3)])})["views"]
    assert images.shape == (3, 3, 32, 32)
