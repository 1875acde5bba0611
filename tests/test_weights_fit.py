"""sslvit.weights.fit: the one position-embedding resampling, shared by evaluation, fine-tuning and continued
pretraining, and the one builder."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from sslvit.backbone import build_vit
from sslvit.checkpoint import export_encoder
from sslvit.errors import CheckpointError
from sslvit.evaluation.load import load_encoder
from sslvit.recipe import ModelConfig
from sslvit.training.finetune import FinetuneConfig, build_classifier
from sslvit.weights import build_model, fit_state_dict, init_weights

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 4, "depth": 1, "embed_dim": 64, "num_heads": 2, "num_classes": 0}


def test_224_to_384_is_timms_resampling_in_evaluation_finetuning_and_pretraining(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model(VIT, num_classes=0).eval()  # the real ViT-Ti/16 at 224: 14 x 14 patches
    args = {"img_size": 224, "patch_size": 16, "num_classes": 0}
    export = export_encoder(vit, VIT, args, tmp_path / "encoder")
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), [24, 24], num_prefix_tokens=1)
    assert expected.shape == (1, 1 + 24 * 24, 192)

    evaluated, identity = load_encoder(str(export), img_size=384)  # evaluation: --img-size 384
    assert identity["img_size"] == 384 and identity["pretrain_img_size"] == 224
    assert torch.equal(evaluated.pos_embed, expected)
    with torch.no_grad():
        assert evaluated(torch.randn(1, 3, 384, 384)).shape == (1, 192)

    at_224, identity_224 = load_encoder(str(export))  # fine-tuning a 224 encoder at 384
    identity_384 = {**identity_224, "model_args": {**identity_224["model_args"], "img_size": 384}}
    classifier, _ = build_classifier(at_224, identity_384, 5, FinetuneConfig())
    assert torch.equal(classifier.pos_embed, expected)

    encoder = build_vit(ModelConfig(name=VIT, img_size=384, patch_size=16))  # continued pretraining at 384
    record = init_weights(f"local-dir:{export}", encoder, encoder)
    assert torch.equal(encoder.pos_embed, expected)
    assert record["resampled"] == ["pos_embed 1x197x192 -> 1x577x192 (14x14 -> 24x24 patches)"]
    assert torch.equal(encoder.blocks[5].mlp.fc1.weight, vit.blocks[5].mlp.fc1.weight)


def test_a_patch_size_change_resamples_the_patch_kernel_and_the_grid():
    torch.manual_seed(0)
    small = timm.create_model(VIT, **TINY)
    large = timm.create_model(VIT, **{**TINY, "patch_size": 8})
    fit = fit_state_dict(large, small.state_dict(), "patch 4", "patch 8")
    kernel = small.patch_embed.proj.weight.detach()
    assert torch.equal(large.patch_embed.proj.weight, resample_patch_embed(kernel, [8, 8]))
    assert torch.equal(large.pos_embed, resample_abs_pos_embed(small.pos_embed.detach(), [4, 4], num_prefix_tokens=1))
    assert fit.resampled == [
        "patch_embed.proj.weight 64x3x4x4 -> 64x3x8x8",
        "pos_embed 1x65x64 -> 1x17x64 (8x8 -> 4x4 patches)",
    ]


def test_the_builder_loads_every_tensor_or_names_what_does_not_fit():
    torch.manual_seed(0)
    vit = timm.create_model(VIT, **TINY).eval()
    rebuilt = build_model(VIT, TINY, vit.state_dict(), "a tiny ViT").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), vit(images))
    does_not_fit = r"a tiny ViT \(depth 1, embed_dim 64, patch 4\) does not fit .* missing keys \[blocks\.1\."
    with pytest.raises(CheckpointError, match=does_not_fit):
        build_model(VIT, {**TINY, "depth": 2}, vit.state_dict(), "a tiny ViT")
    with pytest.raises(CheckpointError, match="timm cannot build"):
        build_model(VIT, {**TINY, "no_such_argument": 1}, vit.state_dict(), "a tiny ViT")
