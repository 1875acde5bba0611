"""Tests for sslvit.training.finetune: the classifier built from an encoder, the named recipes (MAE, DeiT),
repeated augmentation through Accelerate, tiny runs, their export and resume."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from accelerate.data_loader import BatchSamplerShard
from timm.data.distributed_sampler import RepeatAugSampler

from sslvit.accel import make_accelerator
from sslvit.checkpoint import export_encoder
from sslvit.cli import guarded
from sslvit.errors import CheckpointError, RecipeError
from sslvit.evaluation.cli import run_finetune
from sslvit.evaluation.features import open_labelled
from sslvit.evaluation.load import load_encoder
from sslvit.recipe import DataConfig, list_recipes
from sslvit.training.finetune import (
    FinetuneConfig,
    _scheduler,
    build_classifier,
    list_finetune_recipes,
    load_finetune_recipe,
)
from sslvit.training.finetune_data import _train_loader, train_transform
from tests.conftest import flags

ROOT = Path(__file__).resolve().parents[1]

DIGITS = {"data": "digits", "limit_test": 40, "batch_size": 16, "num_workers": 0}  # small, quick evaluations
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
        build_classifier(
            encoder, {**identity, "model_args": {**identity["model_args"], "depth": 3}}, 7, FinetuneConfig()
        )


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
    argv = flags(encoder=encoder_dir, **DIGITS, limit_train=64, json_out=out, set="warmup_epochs=0")  # --set last
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


def test_finetune_recipes_are_listed_apart_from_pretraining_and_load_as_copies():
    names = list_finetune_recipes()
    assert {"finetune_mae", "finetune_deit", "finetune_deit_small_data"} <= set(names)
    assert not set(names) & set(list_recipes())  # pretrain.py --list-recipes does not offer them
    for name in names:
        loaded, cfg = load_finetune_recipe(name)
        cfg.validate()
        assert loaded == name and names[name]  # a one-line description for --list-recipes
        header = (ROOT / "recipes" / f"{name}.py").read_text().split('"""')[1]
        assert f"--recipe {name}" in header, f"{name}: the header must give its launch command"
    assert load_finetune_recipe("finetune_mae")[1] == FinetuneConfig()  # the default stays MAE's protocol
    _, cfg = load_finetune_recipe("finetune_deit")
    cfg.epochs = 1
    assert load_finetune_recipe("finetune_deit")[1].epochs == 300  # a copy: overrides do not leak


def test_deit_small_data_recipe_has_deits_values_and_the_small_data_changes():
    _, deit = load_finetune_recipe("finetune_deit")
    _, small = load_finetune_recipe("finetune_deit_small_data")
    # facebookresearch/deit main.py defaults: lr 5e-4 x batch / 512 (base_lr is per 256), AdamW wd 0.05, ...
    assert deit.base_lr * 512 / 256 == pytest.approx(5e-4)
    assert (deit.epochs, deit.warmup_epochs, deit.warmup_lr, deit.min_lr) == (300, 5, 1e-6, 1e-5)
    assert (deit.weight_decay, deit.layer_decay, deit.drop_path_rate, deit.clip_grad) == (0.05, 1.0, 0.1, 0)
    assert (deit.auto_augment, deit.reprob, deit.repeated_aug) == ("rand-m9-mstd0.5-inc1", 0.25, 3)
    assert (deit.mixup, deit.cutmix, deit.smoothing, deit.batch_size_per_device) == (0.8, 1.0, 0.1, 64)
    # small data: the authors' 1000 epochs for CIFAR/Cars, and at least ViT's 500 warmup steps; nothing else
    assert (small.epochs, small.min_warmup_steps) == (1000, 500)
    changed = {k for k, v in vars(small).items() if vars(deit)[k] != v}
    assert changed == {"epochs", "min_warmup_steps"}


def test_unknown_or_malformed_finetune_recipes_are_one_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="unknown fine-tuning recipe 'finetune_dei'; known: .*finetune_deit"):
        load_finetune_recipe("finetune_dei")
    with pytest.raises(RecipeError, match="must define RECIPE = FinetuneConfig"):
        load_finetune_recipe(str(ROOT / "recipes" / "quickstart.py"))  # a pretraining recipe
    own = tmp_path / "my_finetune.py"
    own.write_text(
        "from dataclasses import replace\nfrom sslvit.recipes.finetune_deit import RECIPE\n"
        "RECIPE = replace(RECIPE, epochs=7)\n"
    )
    expected = dataclasses.replace(load_finetune_recipe("finetune_deit")[1], epochs=7)
    assert load_finetune_recipe(str(own)) == ("my_finetune", expected)


def test_warmup_starts_at_warmup_lr_and_lasts_at_least_min_warmup_steps():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    cfg = FinetuneConfig(epochs=10, warmup_epochs=1, min_warmup_steps=12, warmup_lr=1e-6, min_lr=1e-5)
    derived: dict = {}
    scheduler = _scheduler(optimizer, cfg, steps_per_epoch=4, derived=derived)
    assert derived["warmup_steps"] == 12 and derived["total_steps"] == 40  # 1 epoch = 4 steps < 12
    lrs = []
    for step in (0, 6, 12, 40):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6) and 1e-6 < lrs[1] < 1e-3
    assert lrs[2] == pytest.approx(1e-3) and lrs[3] == pytest.approx(1e-5)


def test_repeated_augmentation_draws_each_image_three_times_per_epoch_through_accelerate():
    data_cfg = DataConfig(path="digits", num_workers=0)
    train, _, _ = open_labelled(data_cfg, "train", None)
    indices = np.arange(100, 196)  # 96 images: less than 256, so an epoch keeps all 96 draws (DeiT rounds to 256)
    cfg = FinetuneConfig(batch_size_per_device=12, repeated_aug=3)
    loader = make_accelerator().prepare(_train_loader(train, indices, 32, cfg, data_cfg, world_size=1))
    assert isinstance(loader.batch_sampler.sampler, RepeatAugSampler)  # prepare kept it (no seedable swap)

    def epoch_draws(epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        return [i for batch in loader.batch_sampler for i in batch]

    first, second = epoch_draws(0), epoch_draws(1)
    assert len(first) == 96 and set(Counter(first).values()) == {3}  # 32 images, each exactly 3 times
    assert [first[i] for i in range(0, 96, 3)] == [first[i + 2] for i in range(0, 96, 3)]  # copies side by side
    assert first != second and epoch_draws(0) == first  # reshuffled per epoch, reproducibly (resume)

    loader.set_epoch(0)
    labels, images = [], []
    for batch in loader:  # the real batches: decoded, augmented, the same label three times in a row
        labels.append(batch["labels"])
        images.append(batch["views"])
    labels, images = torch.cat(labels), torch.cat(images)
    assert len(labels) == 96 and (labels.view(-1, 3) == labels.view(-1, 3)[:, :1]).all()
    assert not torch.equal(images[0], images[1])  # each copy is augmented on its own

    # Under N processes Accelerate shards this one stream by batches: together they see it exactly once.
    shards = [BatchSamplerShard(loader.batch_sampler, num_processes=2, process_index=r) for r in range(2)]
    loader.set_epoch(0)
    assert sorted(i for shard in shards for batch in shard for i in batch) == sorted(first)


def test_finetune_list_recipes_needs_no_encoder(capsys):
    assert guarded(run_finetune, ["--list-recipes"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert any(line.startswith("finetune_deit_small_data ") for line in listed)


def test_deit_small_data_runs_end_to_end_with_every_augmentation_on(encoder_dir, tmp_path):
    out = tmp_path / "ft.json"
    sets = ["epochs=2", "warmup_epochs=1", "min_warmup_steps=4"]
    argv = flags(
        encoder=encoder_dir, limit_train=96, json_out=out, recipe="finetune_deit_small_data", set=sets, **DIGITS
    )
    assert guarded(run_finetune, argv) == 0
    report = json.loads(out.read_text())
    hyper = report["hyperparameters"]
    assert report["protocol"] == hyper["recipe"] == "finetune_deit_small_data"
    assert (hyper["repeated_aug"], hyper["mixup"], hyper["cutmix"], hyper["reprob"]) == (3, 0.8, 1.0, 0.25)
    assert (hyper["auto_augment"], hyper["drop_path_rate"], hyper["layer_decay"]) == ("rand-m9-mstd0.5-inc1", 0.1, 1)
    assert (hyper["steps_per_epoch"], hyper["warmup_steps"], hyper["total_steps"]) == (6, 6, 12)  # 96 draws / 16
    assert hyper["lr"] == pytest.approx(5e-4 * 16 / 512)  # DeiT's scaling
    assert [h["epoch"] for h in report["history"]] == [1, 2] and all(np.isfinite(h["loss"]) for h in report["history"])
    model_dir = tmp_path / "run" / "finetune_deit_small_data" / "model"  # each recipe has its own folder
    assert report["model_dir"] == str(model_dir)
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_accumulation_takes_the_scheduled_steps_and_leaves_out_an_epochs_partial_step(encoder_dir, tmp_path):
    # 64 images in batches of 16 are 4 micro-batches: with accum_steps=3 an epoch is one step of 48 images, as in
    # pretraining (the fourth micro-batch is left out, not stepped on at a third of the gradient past the schedule)
    out = tmp_path / "ft.json"
    sets = ["epochs=2", "warmup_epochs=0", "accum_steps=3"]
    argv = flags(encoder=encoder_dir, **DIGITS, limit_train=64, json_out=out, output_dir=tmp_path / "ft", set=sets)
    assert guarded(run_finetune, argv) == 0
    hyper = json.loads(out.read_text())["hyperparameters"]
    assert (hyper["global_batch_size"], hyper["steps_per_epoch"], hyper["total_steps"]) == (48, 1, 2)
    assert sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
