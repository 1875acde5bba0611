"""Other timm backbones for DINO (a tiny ConvNeXt, a tiny Swin, a fixed-size ResMLP); MAE refuses them clearly."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import timm
import torch

from sslvit.backbone import build_backbone, model_args
from sslvit.checkpoint import complete_checkpoints, export_encoder
from sslvit.cli import guarded
from sslvit.data import open_source
from sslvit.errors import RecipeError
from sslvit.evaluation.cli import run_finetune, run_knn
from sslvit.evaluation.knn import knn_eval
from sslvit.evaluation.load import load_encoder
from sslvit.export import export_onnx
from sslvit.objectives import DINO, MAE, DINOConfig, Progress
from sslvit.objectives.mae import MAEConfig
from sslvit.recipe import DataConfig, ModelConfig
from sslvit.train import pretrain
from sslvit.weights import resolve
from tests.conftest import crops_batch, flags, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crop_size=16, local_crops_number=2)
# timm's smallest ConvNeXt as it is; Swin-T shrunk through timm's own arguments (1 + 1 blocks, 32 wide, 4x4 windows)
TINY_SWIN = {"embed_dim": 32, "depths": (1, 1), "num_heads": (2, 4), "window_size": 4}
BACKBONES = {"convnext_atto": {}, "swin_tiny_patch4_window7_224": TINY_SWIN}
FIRST_CONV = {"convnext_atto": "stem.0.weight", "swin_tiny_patch4_window7_224": "patch_embed.proj.weight"}
DIGITS = DataConfig(path="digits", num_workers=0)


def make_dino(name: str, cfg: DINOConfig = CFG, img_size: int = 32) -> tuple[DINO, dict]:
    """DINO on ``name`` at ``img_size`` px and the model_args its export records."""
    torch.manual_seed(0)
    model = ModelConfig(name=name, img_size=img_size, drop_path_rate=0.1)
    extra = {**DINO.backbone_kwargs(cfg), **BACKBONES.get(name, {})}
    return DINO(build_backbone(model, **extra), cfg), model_args(model, **extra)


@pytest.mark.parametrize("name", BACKBONES)
def test_dino_trains_a_cnn_and_a_swin_and_their_export_loads_in_timm(name, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        dino, args = make_dino(name)
    batch = crops_batch(dino)
    # ConvNeXt's stride-32 stages cannot take 16 px crops: its local crops are made at 32 px, with a warning
    local = 32 if name == "convnext_atto" else 16
    assert [v.shape[-1] for v in batch["views"]] == [32, 32, local, local]
    assert ("local crops are made at the global crop size, 32 px" in caplog.text) == (name == "convnext_atto")

    out = dino(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    first_conv = dino.student_backbone.get_parameter(FIRST_CONV[name])
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=1.0).step()
    teacher_conv = dino.teacher_backbone.get_parameter(FIRST_CONV[name])
    before = teacher_conv.detach().clone()
    logged = dino.after_step(Progress(step=1, total_steps=10, epochs=1))
    m = logged["momentum"]
    torch.testing.assert_close(teacher_conv, m * before + (1 - m) * first_conv.detach())
    assert dino.visualize(batch) == {}  # no class-token attention to draw

    encoder = dino.encoder_for_export().eval()
    export_encoder(encoder, name, args, tmp_path / "encoder")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=True).eval()
    strict = resolve(str(tmp_path / "encoder")).build().eval()  # raises on any missing or unexpected key
    assert type(loaded) is type(encoder) and ("img_size" in args) == (name != "convnext_atto")
    for size in (32, 64) if name == "convnext_atto" else (32, 16):  # Swin's dynamic_img_size travels with it
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(loaded(images), encoder(images)) and torch.equal(strict(images), encoder(images))

    model, identity = load_encoder(str(tmp_path / "encoder"))
    assert (identity["img_size"], identity["pretrain_img_size"], identity["architecture"]) == (32, 32, name)
    result = knn_eval(
        model, open_source(DIGITS, "train"), open_source(DIGITS, "test"), limit_train=200, limit_test=50, batch_size=64
    )
    assert result["num_train"] == 200 and 10 < result["top1"] <= 100  # chance is 10%


def test_model_args_keep_vit_overrides_for_vits_only():
    vit = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2)
    assert model_args(vit, dynamic_img_size=True) == {
        "img_size": 32,
        "patch_size": 4,
        "num_classes": 0,
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 2,
        "dynamic_img_size": True,
    }
    cnn = ModelConfig(name="convnext_atto", img_size=32, patch_size=4, depth=2, embed_dim=64)
    assert model_args(cnn, dynamic_img_size=True) == {"num_classes": 0}  # a CNN takes any size and no img_size
    swin = ModelConfig(name="swin_tiny_patch4_window7_224", img_size=64, patch_size=16)
    assert model_args(swin, dynamic_img_size=True) == {"num_classes": 0, "img_size": 64, "dynamic_img_size": True}
    with pytest.raises(RecipeError, match="'convnxt_atto' is not a timm model"):
        model_args(ModelConfig(name="convnxt_atto"))


def test_a_fixed_size_model_gets_local_crops_at_its_own_size(caplog):
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        dino, args = make_dino(
            "resmlp_12_224",
            DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crop_size=16, local_crops_number=1),
        )
    assert args == {"num_classes": 0, "img_size": 32}  # ResMLP has no dynamic_img_size: timm pins it to 32 px
    assert "resmlp_12_224 cannot take 16 px images" in caplog.text and "objective.local_crops_number=0" in caplog.text
    batch = crops_batch(dino, n=2)
    assert [v.shape[-1] for v in batch["views"]] == [32, 32, 32]
    assert torch.isfinite(dino(batch)["loss"])
    with pytest.raises(RecipeError, match="resmlp_12_224 cannot take 48 px images .*objective.global_crop_size"):
        make_dino("resmlp_12_224", DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, global_crop_size=48))


@pytest.mark.parametrize("name", ["resnet10t", "swin_tiny_patch4_window7_224"])
def test_mae_refuses_a_backbone_that_is_not_a_vit(name):
    encoder = build_backbone(ModelConfig(name=name, img_size=32), **BACKBONES.get(name, {}))
    with pytest.raises(RecipeError, match=f"MAE needs a timm VisionTransformer, but model.name='{name}' builds a"):
        MAE(encoder, MAEConfig(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2))


def test_pretrain_refuses_mae_on_a_cnn_before_any_step(tmp_path):
    with pytest.raises(RecipeError, match="MAE needs a timm VisionTransformer, but model.name='resnet10t'"):
        pretrain(tiny_recipe("quickstart", "model.name=resnet10t"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_quickstart_dino_with_a_cnn_name_pretrains_exports_and_evaluates(tmp_path, caplog):
    """The user's path: --set model.name=convnext_atto on the ViT recipe, then `sslvit knn --encoder RUN`."""
    recipe = tiny_recipe(
        "quickstart_dino",
        "model.name=convnext_atto",
        "model.drop_path_rate=0.1",
        "objective.out_dim=64",
        "objective.hidden_dim=32",
        "objective.bottleneck_dim=16",
        "objective.local_crops_number=2",
    )
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        summary = pretrain(recipe, run)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert "model.depth/model.embed_dim/model.num_heads shape ViTs only: convnext_atto" in caplog.text
    config = json.loads((run / "encoder" / "config.json").read_text())
    assert config["architecture"] == "convnext_atto" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]

    # a training checkpoint rebuilds at the training resolution too (trainer_state.json records it)
    _, from_checkpoint = load_encoder(str(complete_checkpoints(run / "checkpoints")[-1]))
    assert from_checkpoint["img_size"] == 32 and "img_size" not in from_checkpoint["model_args"]
    _, larger = load_encoder(str(run / "encoder"), img_size=48)  # a CNN takes any size as it is
    assert (larger["img_size"], larger["pretrain_img_size"]) == (48, 32)

    argv = flags(encoder=run, data="digits", limit_train=200, limit_test=50, num_workers=0, k=10, no_cache=True)
    assert guarded(run_knn, argv) == 0
    report = json.loads((run / "eval" / "knn.json").read_text())
    assert report["encoder"]["architecture"] == "convnext_atto" and report["metrics"]["top1"] > 10

    # fine-tuning: only the CNN's classifier (head.fc) is new; its head.norm comes from the encoder
    out = tmp_path / "ft.json"
    sizes = {"limit_train": 40, "limit_test": 20, "batch_size": 8, "num_workers": 0}
    argv = flags(encoder=run, data="digits", **sizes, json_out=out, set=["epochs=1", "warmup_epochs=0"])
    assert guarded(run_finetune, argv) == 0
    model = timm.create_model(f"local-dir:{json.loads(out.read_text())['model_dir']}", pretrained=True).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    pytest.importorskip("onnxruntime")
    result = export_onnx(run, tmp_path / "encoder.onnx")
    assert result["output"] == "features (5, 320, 1, 1)" and result["max_abs_diff"] < 1e-4
