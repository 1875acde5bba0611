"""sslvit.weights: the one position-embedding resampling (evaluation, fine-tuning, continued pretraining), the
``model.init`` spec variants, and continued pretraining from an MAE run (into MAE at another size, into DINO)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from sslvit.backbone import build_vit
from sslvit.checkpoint import export_encoder, latest_checkpoint, read_trainer_state
from sslvit.errors import CheckpointError, RecipeError
from sslvit.evaluation.finetune import FinetuneConfig, build_classifier
from sslvit.evaluation.load import load_encoder
from sslvit.objectives import MAE
from sslvit.recipe import ModelConfig
from sslvit.train import pretrain
from sslvit.weights import file_sha256, fit_state_dict, init_weights, read_spec
from tests.conftest import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """A finished tiny MAE run on 32 px digits (depth 2, width 64, patch 4): export + one checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("mae") / "run"
    pretrain(tiny_recipe("quickstart", "train.max_steps=1", "train.checkpoint_every=1", "log.image_every=0"), run)
    torch.set_num_threads(threads)
    return run


def _exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder" / "model.safetensors"))


# --------------------------------------------------------------------------------- one shared resampling


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
    small = timm.create_model(VIT, img_size=32, patch_size=4, depth=1, embed_dim=64, num_heads=2, num_classes=0)
    large = timm.create_model(VIT, img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2, num_classes=0)
    fit = fit_state_dict(large, small.state_dict(), "patch 4", "patch 8")
    kernel = small.patch_embed.proj.weight.detach()
    assert torch.equal(large.patch_embed.proj.weight, resample_patch_embed(kernel, [8, 8]))
    assert torch.equal(large.pos_embed, resample_abs_pos_embed(small.pos_embed.detach(), [4, 4], num_prefix_tokens=1))
    assert fit.resampled == [
        "patch_embed.proj.weight 64x3x4x4 -> 64x3x8x8",
        "pos_embed 1x65x64 -> 1x17x64 (8x8 -> 4x4 patches)",
    ]


# --------------------------------------------------------------------------------------------- spec variants


def test_every_spec_names_the_same_encoder(mae_run, tmp_path):
    exported = _exported(mae_run)
    checkpoint = latest_checkpoint(mae_run / "checkpoints")
    official = tmp_path / "mae_pretrain.pth"  # facebookresearch/mae's format: {'model': encoder + decoder}
    decoder = {"decoder_embed.weight": torch.zeros(32, 64), "mask_token": torch.zeros(1, 1, 32)}
    torch.save({"model": {**exported, **decoder}, "epoch": 1}, official)
    specs = {
        str(mae_run): "export",
        f"local-dir:{mae_run / 'encoder'}": "export",
        str(checkpoint): "checkpoint",
        str(mae_run / "encoder" / "model.safetensors"): "plain",
        str(official): "mae",
    }
    for spec, kind in specs.items():
        weights = read_spec(spec)
        assert weights.kind == kind, spec
        assert weights.state.keys() == exported.keys() and all(
            torch.equal(weights.state[k], exported[k]) for k in exported
        )
    assert read_spec(str(official)).ignored == ["decoder_embed.weight", "mask_token"]
    assert "decoder_pred.weight" in read_spec(str(checkpoint)).ignored  # the objective's own tensors, not the encoder's


def test_bad_specs_are_one_clear_error_before_any_training(mae_run, tmp_path):
    with pytest.raises(CheckpointError, match="neither a folder nor a file"):
        pretrain(tiny_recipe("quickstart", f"model.init={tmp_path / 'nowhere'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "nothing is written before the init is read"
    with pytest.raises(CheckpointError, match="is not a folder"):
        read_spec(f"local-dir:{mae_run / 'encoder' / 'model.safetensors'}")
    with pytest.raises(CheckpointError, match="holds no encoder"):
        read_spec(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"does not fit the recipe's model \(depth 2, embed_dim 32, patch 4\)"):
        pretrain(tiny_recipe("quickstart", f"model.init={mae_run}", "model.embed_dim=32"), tmp_path / "run")
    with pytest.raises(RecipeError, match="needs the network"):
        tiny_recipe("quickstart", "model.init=hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")


# --------------------------------------------------------------------------------------- continued pretraining


def test_continued_mae_pretraining_at_48px_starts_from_the_32px_run(mae_run, tmp_path, caplog):
    caplog.set_level("INFO", logger="sslvit")
    # warmup over the whole schedule: the first step's lr is 0, so the export holds the weights the run started from
    overrides = [f"model.init={mae_run}", "model.img_size=48", "schedule.warmup_epochs=30", "train.checkpoint_every=1"]
    pretrain(tiny_recipe("quickstart", *overrides, "train.max_steps=1"), tmp_path / "b")
    source, started = _exported(mae_run), _exported(tmp_path / "b")
    assert started["pos_embed"].shape == (1, 1 + 12 * 12, 64)
    assert torch.equal(started["pos_embed"], resample_abs_pos_embed(source["pos_embed"], [12, 12], num_prefix_tokens=1))
    assert all(torch.equal(started[k], source[k]) for k in source if k != "pos_embed")
    torch.manual_seed(0)  # a run without model.init starts elsewhere: the comparison above can fail
    fresh = MAE(build_vit(tiny_recipe("quickstart", "model.img_size=48").model), tiny_recipe().objective)
    assert not torch.equal(fresh.encoder_for_export().blocks[0].attn.qkv.weight, started["blocks.0.attn.qkv.weight"])

    messages = [r.getMessage() for r in caplog.records]
    sha = file_sha256(mae_run / "encoder" / "model.safetensors")
    assert (
        f"model.init: loaded 30 encoder tensors from {(mae_run / 'encoder').resolve()} (export, sha256 {sha})"
        in messages
    )
    assert "model.init: resampled pos_embed 1x65x64 -> 1x145x64 (8x8 -> 12x12 patches)" in messages
    assert any(m.startswith("model.init: newly initialised") and "decoder_pred.* (2)" in m for m in messages)
    state = read_trainer_state(latest_checkpoint(tmp_path / "b" / "checkpoints"))
    assert state["init"]["sha256"] == sha and state["init"]["spec"] == str(mae_run)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["init"] == str(mae_run)

    caplog.clear()  # running again resumes its own checkpoint; the init is not applied a second time
    pretrain(tiny_recipe("quickstart", *overrides, "train.max_steps=2"), tmp_path / "b")
    messages = [r.getMessage() for r in caplog.records]
    assert f"model.init={mae_run} not applied: this run resumes from its own checkpoint" in messages
    assert not any(m.startswith("model.init: loaded") for m in messages)
    assert read_trainer_state(latest_checkpoint(tmp_path / "b" / "checkpoints"))["init"]["sha256"] == sha


def test_dino_from_an_mae_checkpoint_starts_teacher_and_student_at_the_loaded_encoder(mae_run, tmp_path, caplog):
    caplog.set_level("INFO", logger="sslvit")
    checkpoint = latest_checkpoint(mae_run / "checkpoints")
    overrides = [f"model.init={checkpoint}", "schedule.warmup_epochs=4", "train.max_steps=1", "log.image_every=0"]
    pretrain(tiny_recipe("quickstart_dino", *overrides), tmp_path / "dino")
    source = _exported(mae_run)
    state = load_file(str(latest_checkpoint(tmp_path / "dino" / "checkpoints") / "model.safetensors"))
    for key, value in source.items():
        assert torch.equal(state[f"student_backbone.{key}"], value), key  # lr 0 at the first step
        assert torch.allclose(state[f"teacher_backbone.{key}"], value, atol=1e-6), key  # EMA of two equal encoders
    messages = [r.getMessage() for r in caplog.records]
    assert "model.init: copied into teacher_backbone too (starts equal to the encoder)" in messages
    assert any(m.startswith("model.init: newly initialised") and "student_head" in m for m in messages)
    assert any(m.startswith("model.init: ignored from the source") and "decoder" in m for m in messages)
