"""The encoder export: timm's local-dir loader rebuilds exactly what sslvit trained, bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch

from sslvit.errors import CheckpointError
from sslvit.evaluation.load import load_encoder
from sslvit.train import pretrain
from sslvit.weights import latest_checkpoint, resolve
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
    ours = resolve(str(encoder_dir)).build().eval()
    from_checkpoint, _ = load_encoder(str(latest_checkpoint(trained_run / "checkpoints")))
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


def test_the_end_of_run_export_is_readable_as_the_umask_allows(trained_run):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (trained_run / "encoder").iterdir()}
    assert modes == {"config.json": 0o666 & ~mask, "model.safetensors": 0o666 & ~mask}  # safetensors alone gives 0600


def test_an_empty_folder_is_no_export(tmp_path):
    with pytest.raises(CheckpointError, match="holds no encoder"):
        resolve(f"local-dir:{tmp_path}")
