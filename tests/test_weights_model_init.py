"""sslvit.weights.model_init: continued pretraining from an MAE run (into MAE at another size, into DINO)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from sslvit.backbone import build_vit
from sslvit.objectives import MAE
from sslvit.train import pretrain
from sslvit.weights import file_sha256, latest_checkpoint, read_trainer_state
from tests.conftest import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _exported(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder" / "model.safetensors"))


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
    overrides = [
        f"model.init={checkpoint}",
        "schedule.epochs=4",
        "schedule.warmup_epochs=4",
        "train.max_steps=1",
        "log.image_every=0",
    ]
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
