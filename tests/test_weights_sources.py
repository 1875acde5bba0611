"""sslvit.weights.sources: every kind of source the one resolver reads names the same encoder; bad ones are one
clear error before any training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sslvit.errors import CheckpointError, RecipeError
from sslvit.train import pretrain
from sslvit.weights import latest_checkpoint, resolve
from tests.conftest import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_spec_names_the_same_encoder(mae_run, tmp_path):
    exported = load_file(str(mae_run / "encoder" / "model.safetensors"))
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
        weights = resolve(spec, key="model.init")
        assert weights.kind == kind, spec
        assert weights.state.keys() == exported.keys() and all(
            torch.equal(weights.state[k], exported[k]) for k in exported
        )
    assert resolve(str(official)).ignored == ["decoder_embed.weight", "mask_token"]
    assert "decoder_pred.weight" in resolve(str(checkpoint)).ignored  # the objective's own tensors, not the encoder's


def test_a_run_folder_its_export_and_its_checkpoint_record_the_same_architecture_and_run(mae_run):
    export, checkpoint = resolve(str(mae_run / "encoder")), resolve(str(latest_checkpoint(mae_run / "checkpoints")))
    for weights in (export, checkpoint):
        assert weights.architecture == "vit_tiny_patch16_224" and weights.run.root == mae_run
        assert weights.model_args["depth"] == 2 and list(weights.input_size)[-1] == 32
    assert resolve(str(mae_run)).path == mae_run / "encoder"  # a run folder: its export first


def test_bad_specs_are_one_clear_error_before_any_training(mae_run, tmp_path):
    with pytest.raises(CheckpointError, match="neither a folder nor a file"):
        pretrain(tiny_recipe("quickstart", f"model.init={tmp_path / 'nowhere'}"), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "nothing is written before the init is read"
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve(f"local-dir:{mae_run / 'encoder' / 'model.safetensors'}")
    with pytest.raises(CheckpointError, match="holds no encoder"):
        resolve(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"does not fit the recipe's model \(depth 2, embed_dim 32, patch 4\)"):
        pretrain(tiny_recipe("quickstart", f"model.init={mae_run}", "model.embed_dim=32"), tmp_path / "run")
    with pytest.raises(RecipeError, match="needs the network"):
        tiny_recipe("quickstart", "model.init=hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
