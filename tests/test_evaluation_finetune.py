"""Tests for sslvit.evaluation.finetune: the classifier built from an encoder, a tiny run, its export and resume."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from sslvit.checkpoint import export_encoder
from sslvit.cli import guarded
from sslvit.errors import CheckpointError, RecipeError
from sslvit.evaluation.cli import run_finetune
from sslvit.evaluation.finetune import FinetuneConfig, build_classifier, train_transform
from sslvit.evaluation.load import load_encoder

ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def encoder_dir(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **ARGS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")  # a run folder: eval output goes inside it
    return export_encoder(vit, "vit_tiny_patch16_224", ARGS, tmp_path / "run" / "encoder")


@pytest.mark.parametrize("pool, new", [("avg", {"head", "fc_norm"}), ("token", {"head"})])
def test_classifier_keeps_the_encoder_and_adds_only_the_head(encoder_dir, pool, new):
    encoder, identity = load_encoder(str(encoder_dir))
    model, args = build_classifier(encoder, identity, 7, FinetuneConfig(global_pool=pool))
    assert args["num_classes"] == 7 and model.head.out_features == 7
    own = encoder.state_dict()
    fresh = {k.split(".")[0] for k, v in model.state_dict().items() if k not in own or not torch.equal(v, own[k])}
    assert fresh == new
    assert model.head.weight.std() < 1e-4  # MAE's trunc-normal(2e-5) head


def test_classifier_refuses_an_encoder_that_does_not_fit(encoder_dir):
    encoder, identity = load_encoder(str(encoder_dir))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_classifier(encoder, {**identity, "model_args": {**identity["model_args"], "depth": 3}}, 7,
                         FinetuneConfig())  # fmt: skip


def test_randaugment_survives_posterize_at_full_magnitude():
    from PIL import Image

    transform = train_transform(32, FinetuneConfig(auto_augment="rand-m10-n8-inc1"))  # every op at magnitude 10
    for _ in range(30):
        assert transform(Image.new("RGB", (32, 32), (200, 100, 50))).shape == (3, 32, 32)


def test_mixup_needs_an_even_batch():
    with pytest.raises(RecipeError, match="even"):
        FinetuneConfig(batch_size_per_device=15).validate()


def test_tiny_finetune_exports_a_timm_model_and_resumes(encoder_dir, tmp_path):
    out = tmp_path / "ft.json"
    argv = ["--encoder", str(encoder_dir), "--data", "digits", "--limit-train", "64", "--limit-test", "40",
            "--batch-size", "16", "--num-workers", "0", "--json-out", str(out), "--set", "warmup_epochs=0"]  # fmt: skip
    assert guarded(run_finetune, [*argv, "epochs=1"]) == 0
    report = json.loads(out.read_text())
    assert report["resumed_from_epoch"] == 0 and len(report["history"]) == 1
    assert report["metrics"]["best_top1"] == report["history"][0]["top1"]
    assert report["hyperparameters"]["layer_decay"] == 0.65 and report["hyperparameters"]["global_batch_size"] == 16
    model_dir = tmp_path / "run" / "finetune" / "model"  # default: <run>/finetune
    assert report["model_dir"] == str(model_dir)
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    assert model.num_classes == 10 and json.loads((model_dir / "class_names.json").read_text())[3] == "3"

    assert guarded(run_finetune, [*argv, "epochs=2"]) == 0  # the same command, one epoch more: resumes
    report = json.loads(out.read_text())
    assert report["resumed_from_epoch"] == 1 and [h["epoch"] for h in report["history"]] == [1, 2]
    again = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    assert not torch.equal(again.head.weight, model.head.weight)  # the second epoch trained and re-exported
