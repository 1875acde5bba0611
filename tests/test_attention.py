"""Mean attention distance (ViT paper, Figure 7): exact hand-built cases, a real tiny ViT, the command line."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.checkpoint import export_encoder
from sslvit.cli import guarded, main
from sslvit.errors import UserError
from sslvit.evaluation.attention import (
    distance_per_head,
    mean_attention_distance,
    patch_distances,
    run_attention_distance,
)
from sslvit.viz import attention_weights
from tests.conftest import flags

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 0}
MODEL_ARGS = ["img_size=32", "patch_size=4", "depth=2", "embed_dim=64", "num_heads=2"]
RANDOM_TINY = ["--encoder", "vit_tiny_patch16_224", "--weights", "random", "--model-args", *MODEL_ARGS]


def centres(h: int, w: int, patch: int) -> list[tuple[float, float]]:
    """Pixel centres of an h x w patch grid, row-major, written out independently of the code under test."""
    return [((r + 0.5) * patch, (c + 0.5) * patch) for r in range(h) for c in range(w)]


def test_patch_distances_are_pixel_distances_between_patch_centres():
    points = centres(3, 5, 4)
    expected = torch.tensor([[math.dist(a, b) for b in points] for a in points], dtype=torch.float64)
    torch.testing.assert_close(patch_distances((3, 5), (4, 4)), expected)
    assert patch_distances((3, 5), (4, 4))[0, -1] == pytest.approx(4 * math.hypot(2, 4))


def test_hand_built_attention_gives_the_exact_distance():
    h, w, patch, heads, prefix = 4, 4, 8, 3, 1
    p, t = h * w, h * w + prefix
    points = centres(h, w, patch)
    weights = torch.zeros(2, heads, t, t)
    weights[:, 0, prefix:, prefix:] = torch.eye(p)  # head 0: every patch attends only to itself
    weights[:, 1] = 1.0 / t  # head 1: uniform over all tokens, the class token included
    weights[:, 2, :, prefix] = 0.5  # head 2: half to the class token, half to the top-left patch
    weights[:, 2, :, 0] = 0.5
    distance, prefix_mass = distance_per_head(weights, prefix, patch_distances((h, w), (patch, patch)))

    mean_pairwise = sum(math.dist(a, b) for a, b in itertools.product(points, points)) / p**2
    to_top_left = sum(math.dist(a, points[0]) for a in points) / p
    torch.testing.assert_close(distance, torch.tensor([[0.0, mean_pairwise, to_top_left]] * 2, dtype=torch.float64))
    torch.testing.assert_close(prefix_mass, torch.tensor([[0.0, 1 / t, 0.5]] * 2, dtype=torch.float64))


def test_registers_count_as_prefix_tokens():
    weights = torch.zeros(1, 1, 3 + 4, 3 + 4)  # class token + 2 registers, then a 2 x 2 grid
    weights[0, 0, :, 1] = 0.75  # a register
    weights[0, 0, :, 6] = 0.25  # the bottom-right patch
    distance, prefix_mass = distance_per_head(weights, 3, patch_distances((2, 2), (4, 4)))
    assert distance.item() == pytest.approx((2 * 4 + 4 * math.sqrt(2)) / 4)  # corner-to-corner diagonal, sides, self
    assert prefix_mass.item() == pytest.approx(0.75)


def test_a_real_vit_with_zero_queries_and_keys_attends_uniformly():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    for block in vit.blocks:
        block.attn.qkv.weight.data[: 2 * 64].zero_()  # q = k = 0: every weight is 1 / T
        block.attn.qkv.bias.data[: 2 * 64].zero_()
    result = mean_attention_distance(vit, [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)])
    points = centres(8, 8, 4)
    mean_pairwise = sum(math.dist(a, b) for a, b in itertools.product(points, points)) / 64**2
    assert result["num_images"] == 5 and result["distance"].shape == (2, 2)
    assert result["distance"] == pytest.approx(mean_pairwise, rel=1e-6)
    assert result["uniform_distance"] == pytest.approx(mean_pairwise)
    assert result["prefix_mass"] == pytest.approx(1 / 65, rel=1e-5)
    assert result["max_distance"] == pytest.approx(4 * 7 * math.sqrt(2))


def test_first_block_matches_attention_recomputed_by_hand_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    for block in vit.blocks:  # sharpen the random attention, so a mix-up of queries and keys shows
        block.attn.qkv.weight.data.mul_(8.0)
    images = torch.randn(4, 3, 32, 32)
    result = mean_attention_distance(vit, [images])

    attn = vit.blocks[0].attn
    with torch.no_grad():
        tokens = vit.blocks[0].norm1(vit.norm_pre(vit._pos_embed(vit.patch_embed(images))))
        q, k, _ = attn.qkv(tokens).reshape(4, 65, 3, 2, 32).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * 32**-0.5).softmax(dim=-1)
    expected, _ = distance_per_head(weights, 1, patch_distances((8, 8), (4, 4)))
    assert result["distance"][0] == pytest.approx(expected.mean(dim=0).numpy(), rel=1e-4)
    assert result["distance"].std() > 0.1  # heads and layers differ once attention is not uniform
    for block in vit.blocks:  # fast path back on, no hook left behind
        assert block.attn.fused_attn == timm.layers.use_fused_attn()
        assert not block.attn.attn_drop._forward_pre_hooks


def test_attention_weights_reads_only_the_chosen_blocks():
    vit = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    seen = []
    with attention_weights(vit, lambda i, w: seen.append((i, tuple(w.shape))), blocks=[1]), torch.no_grad():
        vit(torch.randn(2, 3, 32, 32))
    assert seen == [(1, (2, 2, 65, 65))]


def test_a_model_without_vit_attention_is_one_clear_error():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
    with pytest.raises(UserError, match="attention distance needs a ViT"):
        mean_attention_distance(cnn, [torch.randn(1, 3, 32, 32)])


def test_cli_writes_json_plots_and_tensorboard_into_the_run_folder(tmp_path, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    export_encoder(timm.create_model("vit_tiny_patch16_224", **TINY), "vit_tiny_patch16_224", TINY, run / "encoder")
    argv = flags(encoder=run, data="digits", num_images=10, num_maps=3, batch_size=4, num_workers=0)
    assert main(["attention-distance", *argv]) == 0

    report = json.loads((run / "eval" / "attention_distance.json").read_text())
    assert report["data"]["num_images"] == 10 and report["data"]["grid"] == [8, 8]
    distance = report["metrics"]["distance"]
    assert len(distance) == 2 and all(len(row) == 2 for row in distance)
    assert min(min(row) for row in distance) > 0 and max(max(row) for row in distance) < 39.6
    assert "layer" in capsys.readouterr().out

    plot = Image.open(run / "eval" / "attention_distance.png")
    assert plot.size == (600, 432)  # 5 x 3.6 inches at 120 dpi
    maps = Image.open(run / "eval" / "attention_distance_maps.png")
    assert maps.size == (3 * 129 + 1, 3 * 129 + 1)  # 3 images x (image + 2 heads), 32 px shown at 128, 1 px padding

    events = EventAccumulator(str(run / "tensorboard" / "attention_distance"))
    events.Reload()
    head_1 = events.Scalars("attention_distance/head_1")
    assert [e.step for e in head_1] == [1, 2]
    assert [e.value for e in head_1] == pytest.approx([row[1] for row in distance], abs=1e-4)
    assert {"attention_distance/plot", "attention_maps/cls_last_block"} <= set(events.Tags()["images"])


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = ["--json-out", str(tmp_path / "a.json")]
    assert guarded(run_attention_distance, [*RANDOM_TINY, "--data", "digits", "--num-images", "0", *out]) == 2
    assert "--num-images 0" in capsys.readouterr().err
    assert guarded(run_attention_distance, [*RANDOM_TINY, "--data", str(tmp_path / "missing"), *out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert guarded(run_attention_distance, ["--encoder", "resnet18", "--weights", "random", "--data", "digits"]) == 2
    assert "VisionTransformer" in capsys.readouterr().err
