"""The encoder export: timm's local-dir loader rebuilds exactly what sslvit trained, bit for bit."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from sslvit.checkpoint import encoder_from_checkpoint, export_run, latest_checkpoint, load_exported_encoder
from sslvit.errors import CheckpointError
from sslvit.train import pretrain
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    pretrain(tiny_recipe("quickstart", "train.max_steps=2", "log.image_every=0"), run)
    return run


def test_timm_local_dir_rebuilds_the_encoder_bit_for_bit(trained_run):
    encoder_dir = trained_run / "encoder"
    assert sorted(p.name for p in encoder_dir.iterdir()) == ["config.json", "model.safetensors"]
    from_timm = timm.create_model(f"local-dir:{encoder_dir}", pretrained=True, num_classes=0).eval()
    ours = load_exported_encoder(encoder_dir)
    from_checkpoint = encoder_from_checkpoint(latest_checkpoint(trained_run / "checkpoints"))
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = ours(images)
        assert reference.shape == (3, 64)
        assert torch.equal(from_timm(images), reference)
        assert torch.equal(from_checkpoint(images), reference)
        assert torch.equal(from_timm.forward_features(images), ours.forward_features(images))
    config = json.loads((encoder_dir / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["depth"] == 2 and config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]


def test_export_command_rewrites_the_encoder_from_the_newest_checkpoint(trained_run, capsys):
    from sslvit.cli import main

    before = (trained_run / "encoder" / "model.safetensors").read_bytes()
    assert main(["export", str(trained_run)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert (trained_run / "encoder" / "model.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".tmp") for p in trained_run.iterdir())


def test_export_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        export_run(tmp_path)
    with pytest.raises(CheckpointError, match="needs config.json and model.safetensors"):
        load_exported_encoder(tmp_path)


def test_a_half_written_checkpoint_is_never_picked(trained_run, tmp_path):
    (trained_run / "checkpoints" / ".tmp-step_00000009").mkdir()
    (trained_run / "checkpoints" / "step_00000010").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(trained_run / "checkpoints").name == "step_00000002"
