"""Recipes: loading, overrides, validation errors, derived values, and the CLI's behaviour on mistakes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sslvit.cli import main
from sslvit.errors import RecipeError
from sslvit.recipe import apply_overrides, list_recipes, load_recipe
from sslvit.training.derived import derive

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads_validates_and_is_named_after_its_file():
    names = list_recipes()
    assert {"mae_vit_b", "mae_vit_l", "mae_vit_h", "mae_vit_tiny_cifar", "quickstart"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        recipe.validate()
        assert recipe.name == name
        header = (ROOT / "recipes" / f"{name}.py").read_text().split('"""')[1]
        assert "pretrain.py --recipe " + name in header, f"{name}: the header must give its launch command"


def test_mae_vit_b_has_the_official_hyperparameters():
    r = load_recipe("mae_vit_b")
    assert (r.objective.mask_ratio, r.objective.norm_pix_loss) == (0.75, True)
    assert (r.objective.decoder_depth, r.objective.decoder_embed_dim, r.objective.decoder_num_heads) == (8, 512, 16)
    assert (r.model.name, r.model.img_size, r.model.patch_size) == ("vit_base_patch16_224", 224, 16)
    assert (r.optim.base_lr, r.optim.weight_decay, r.optim.betas, r.optim.min_lr) == (1.5e-4, 0.05, (0.9, 0.95), 0)
    assert (r.schedule.epochs, r.schedule.warmup_epochs, r.train.global_batch_size) == (800, 40, 4096)
    assert r.objective.min_crop_scale == 0.2
    assert load_recipe("mae_vit_l").model.name == "vit_large_patch16_224"
    huge = load_recipe("mae_vit_h").model
    assert (huge.name, huge.patch_size) == ("vit_huge_patch14_224", 14)


def test_overrides_parse_by_type_and_do_not_leak_into_other_loads():
    r = apply_overrides(
        load_recipe("mae_vit_b"),
        [
            "optim.base_lr=1e-3",
            "train.max_steps=7",
            "objective.norm_pix_loss=false",
            "optim.betas=0.8,0.9",
            "optim.weight_decay_end=0.4",
            "model.depth=2",
            "train.precision=no",
            "data.path=/x",
        ],
    )
    assert (r.optim.base_lr, r.train.max_steps, r.objective.norm_pix_loss) == (1e-3, 7, False)
    assert (r.optim.betas, r.optim.weight_decay_end, r.model.depth, r.train.precision) == ((0.8, 0.9), 0.4, 2, "no")
    assert load_recipe("mae_vit_b").optim.base_lr == 1.5e-4
    assert apply_overrides(load_recipe("mae_vit_b"), ["optim.weight_decay_end=none"]).optim.weight_decay_end is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.bse_lr=1", "unknown recipe key 'optim.bse_lr'"),
        ("optimizer.base_lr=1", "unknown recipe key 'optimizer'"),
        ("train.max_steps=ten", "train.max_steps needs an integer"),
        ("optim.base_lr=fast", "optim.base_lr needs a number"),
        ("objective.norm_pix_loss=maybe", "objective.norm_pix_loss needs true or false"),
        ("train.precision=fp8", "train.precision='fp8' is not allowed"),
        ("optim.betas=0.9", "optim.betas needs 2 comma-separated values"),
        ("objective.name=byol", "objective.name='byol' is not an objective; known objectives: mae, dino"),
        ("noequals", "must look like section.field=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(load_recipe("mae_vit_b"), [override])


def test_objective_name_switches_to_that_objectives_defaults_and_keeps_the_other_sections():
    from sslvit.objectives import DINOConfig

    mae = load_recipe("mae_vit_b")
    # objective.name applies first, whatever its place: the DINO field after it would be unknown to MAE
    recipe = apply_overrides(load_recipe("mae_vit_b"), ["objective.out_dim=1024", "objective.name=dino"])
    assert recipe.objective == dataclasses.replace(DINOConfig(), out_dim=1024)
    assert (recipe.model, recipe.optim, recipe.train, recipe.name) == (mae.model, mae.optim, mae.train, mae.name)
    same = apply_overrides(load_recipe("mae_vit_b"), ["objective.mask_ratio=0.5", "objective.name=mae"])
    assert same.objective.mask_ratio == 0.5  # naming the objective it already is keeps its settings


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.mask_ratio=1.0", "objective.mask_ratio=1.0 must be strictly between 0 and 1"),
        ("objective.mask_ratio=0", "objective.mask_ratio=0.0 must be strictly between 0 and 1"),
        ("model.img_size=100", "model.img_size=100 is not divisible by model.patch_size=16"),
        ("schedule.warmup_epochs=900", "schedule.warmup_epochs=900.0 must be between 0 and schedule.epochs"),
        ("objective.decoder_num_heads=7", "objective.decoder_embed_dim=512 is not divisible"),
        ("train.batch_size_per_device=0", "train.batch_size_per_device must be positive"),
    ],
)
def test_impossible_values_fail_validation_naming_the_key(override, message):
    recipe = apply_overrides(load_recipe("mae_vit_b"), [override])
    with pytest.raises(RecipeError, match=message):
        recipe.validate()


def test_derived_values_follow_world_size_and_batch():
    r = load_recipe("mae_vit_b")
    one = derive(r, world_size=1, num_samples=1_281_167)
    assert (one.grad_accum_steps, one.global_batch_size, one.lr) == (64, 4096, pytest.approx(1.5e-4 * 16))
    assert (one.steps_per_epoch, one.total_steps, one.warmup_steps) == (312, 312 * 800, 312 * 40)
    eight = derive(r, world_size=8, num_samples=1_281_167)
    assert (eight.grad_accum_steps, eight.global_batch_size) == (8, 4096)
    quick = derive(apply_overrides(load_recipe("mae_vit_b"), ["train.max_steps=100"]), 1, 1_281_167)
    assert (quick.total_steps, quick.warmup_steps) == (100, 5)  # the schedule compressed into max_steps
    with pytest.raises(RecipeError, match="not a multiple of 3 process"):
        derive(r, world_size=3, num_samples=None)


def test_recipe_by_path(tmp_path):
    path = tmp_path / "my_recipe.py"
    path.write_text(  # a variant replaces the section it changes: replace() is shallow, BASE.optim is shared
        "from dataclasses import replace\nfrom sslvit.recipes.quickstart import RECIPE as BASE\n"
        "RECIPE = replace(BASE, optim=replace(BASE.optim, base_lr=2e-4))\n"
    )
    shipped = load_recipe("quickstart").optim.base_lr
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.optim.base_lr) == ("my_recipe", 2e-4)
    assert load_recipe("quickstart").optim.base_lr == shipped != 2e-4  # the shipped recipe is left as it was
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope")


def test_cli_print_config_shows_resolved_and_derived_values(capsys):
    assert main(["pretrain", "--recipe", "quickstart", "--print-config", "--set", "optim.base_lr=3e-4"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["optim"]["base_lr"] == 3e-4
    assert config["derived"]["lr"] == pytest.approx(3e-4 * 64 / 256)
    assert config["derived"]["num_samples"] == 1437  # digits train split, counted without decoding
    assert config["derived"]["total_steps"] == 1437 // 64 * config["schedule"]["epochs"]


def test_cli_user_errors_are_one_line_and_exit_2():
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--recipe", "mae_vit_b", "--set", "model.img_size=100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model.img_size=100 is not divisible")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd[:4], "--list-recipes"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "mae_vit_b" in proc.stdout.split()
