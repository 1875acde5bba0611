"""benchmarks/throughput.py: its JSON, its FLOP count and its MFU, on tiny configs in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState

from tests.conftest import TINY_MODEL

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
throughput = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = throughput  # its dataclass resolves annotations through sys.modules
spec.loader.exec_module(throughput)

TINY = [s for s in TINY_MODEL if not s.startswith(("model.img_size", "model.patch_size"))]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The benchmark resets Accelerate's global state; leave none behind for other tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=False)


def tiny(objective: str, **kwargs) -> throughput.Config:
    overrides = [*TINY]
    if objective == "mae":
        overrides += ["objective.decoder_embed_dim=32", "objective.decoder_depth=1", "objective.decoder_num_heads=2"]
    else:
        overrides += ["objective.out_dim=256", "objective.hidden_dim=64", "objective.bottleneck_dim=32"]
    defaults = {"precision": "fp32", "windows": 2, "steps": 1, "warmup": 1, "matmul_size": 256}
    return throughput.Config(objective, "vit_tiny_patch16_224", 32, 4, 8, overrides=overrides, **{**defaults, **kwargs})


def check_record(record: dict) -> None:
    """Every ratio in the record is computed from the record's own medians."""
    json.dumps(record)  # one JSON object per measurement
    assert record["a_images_per_s"] > 0 and record["b_images_per_s"] > 0
    assert len(record["a_window_images_per_s"]) == record["windows"]
    ratios = [a / b for a, b in zip(record["a_window_images_per_s"], record["b_window_images_per_s"])]
    assert min(ratios) * 0.98 <= record["a_over_b"] <= max(ratios) * 1.02  # the median of the window pairs
    for side in ("a", "b"):
        achieved = record[f"{side}_flops_per_image"] * record[f"{side}_images_per_s"]
        assert record[f"{side}_achieved_flops_per_s"] == pytest.approx(achieved, rel=0.01)
        assert record[f"{side}_mfu"] == pytest.approx(achieved / record["matmul_peak_flops_per_s"], abs=2e-3, rel=0.01)


def test_mae_against_lightly_does_the_same_work(one_thread):
    record = throughput.run(tiny("mae"))
    check_record(record)
    assert (record["a"], record["b"], record["crops"], record["precision"]) == ("sslvit", "lightly", "1x32", "fp32")
    # the same model on the same batch: lightly's example MAE and ours count the same FLOPs
    assert record["a_flops_per_image"] == pytest.approx(record["b_flops_per_image"], rel=0.01)


def test_dino_against_lightly_counts_every_crop(one_thread):
    record = throughput.run(tiny("dino", local_crops=2, local_size=16))
    check_record(record)
    assert record["crops"] == "2x32+2x16"
    assert record["a_flops_per_image"] == pytest.approx(record["b_flops_per_image"], rel=0.02)
    one_crop = throughput.run(tiny("dino", local_crops=1, local_size=16))["a_flops_per_image"]
    assert record["a_flops_per_image"] > one_crop  # a local crop more is more work


def test_a_lever_is_timed_against_sslvit_itself(one_thread):
    record = throughput.run(tiny("mae", compare="adamw:fused"))
    check_record(record)
    assert record["b"] == "sslvit+adamw:fused"
    assert record["a_flops_per_image"] == record["b_flops_per_image"]  # the optimizer adds no model FLOPs


def test_flop_count_is_the_analytic_vit_count_and_restores_fused_attention(one_thread):
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2, num_classes=0
    )
    images = torch.randn(2, 3, 32, 32)
    flops = throughput.count_flops(lambda: vit(images), vit)
    tokens, dim, patches = 65, 64, 64
    per_block = 2 * tokens * dim * (3 * dim + dim + 4 * dim + 4 * dim) + 2 * 2 * tokens * tokens * dim
    expected = 2 * (2 * patches * 3 * 4 * 4 * dim + 2 * per_block)
    assert flops == expected
    assert all(block.attn.fused_attn == timm.layers.use_fused_attn() for block in vit.blocks)


@pytest.mark.parametrize("suite", sorted(throughput.SUITES))
def test_every_suite_case_builds_a_valid_recipe_of_its_own_shape(suite):
    for cfg in throughput.SUITES[suite]:
        recipe = throughput.make_recipe(cfg)  # validated: a case the recipe refuses fails here, not in the bench
        model, train = recipe.model, recipe.train
        shape = (recipe.objective.name, model.name, model.img_size, model.patch_size, train.batch_size_per_device)
        assert shape == (cfg.objective, cfg.model, cfg.img, cfg.patch, cfg.batch)
        assert train.precision == ("no" if cfg.precision == "fp32" else cfg.precision)
        if cfg.local_crops is not None:
            crops = (recipe.objective.local_crops_number, recipe.objective.local_crop_size)
            assert crops == (cfg.local_crops, cfg.local_size)
