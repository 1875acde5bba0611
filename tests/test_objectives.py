"""Every objective in the table passes the same checks with a tiny ViT (STYLE.md), SimSiam with SGD included.

For each entry of :data:`sslvit.objectives.OBJECTIVES` (and the example SimSiam, registered here with one table
line): a finite loss, gradients that reach the encoder, the hooks called by the loop, an export that loads strictly
into ``timm.create_model``, and a resume from step 1 that ends bit-identical to the uninterrupted 2-step run.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections import Counter

import pytest
import timm
import torch
from safetensors.torch import load_file

from sslvit.objectives import OBJECTIVES
from sslvit.recipe import Recipe, apply_overrides
from sslvit.train import build_objective, make_optimizer, pretrain
from tests import simsiam_objective
from tests.conftest import TINY_RUN, crops_batch, tiny_recipe

# The tiny settings of each objective: a new entry in the table fails test_every_objective_has_tiny_settings
# until it is added here.
TINY = {
    "mae": lambda *extra: tiny_recipe("quickstart", *extra),
    "dino": lambda *extra: tiny_recipe(
        "quickstart_dino",
        "objective.out_dim=64",
        "objective.hidden_dim=32",
        "objective.bottleneck_dim=16",
        "objective.local_crops_number=2",
        *extra,
    ),
    "mocov3": lambda *extra: tiny_recipe("quickstart_mocov3", "objective.mlp_dim=32", "objective.out_dim=16", *extra),
    "ibot": lambda *extra: tiny_recipe(
        "quickstart_ibot",
        "objective.out_dim=64",
        "objective.hidden_dim=32",
        "objective.bottleneck_dim=16",
        "objective.local_crops_number=2",
        *extra,
    ),
    "ijepa": lambda *extra: tiny_recipe(
        "quickstart_ijepa", "objective.predictor_embed_dim=32", "objective.predictor_depth=1", *extra
    ),
    "simsiam": lambda *extra: _simsiam_recipe(*extra),
}
HOOKS = ("before_step", "after_backward", "after_step")


def _simsiam_recipe(*extra: str) -> Recipe:
    heads = ["objective.proj_hidden_dim=64", "objective.out_dim=64", "objective.pred_hidden_dim=16"]
    recipe = apply_overrides(copy.deepcopy(simsiam_objective.RECIPE), [*TINY_RUN, *heads, *extra])
    recipe.validate()
    return recipe


@pytest.fixture(autouse=True)
def simsiam_in_the_table(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "simsiam", simsiam_objective.SimSiam)  # the one table line SimSiam needs


def test_every_objective_has_tiny_settings_and_a_config_named_as_its_table_entry():
    assert set(OBJECTIVES) <= set(TINY)
    for name, cls in OBJECTIVES.items():  # --set objective.name=NAME builds cls.Config() with its defaults
        assert cls.name == cls.Config().name == name


@pytest.mark.parametrize("name", [*OBJECTIVES, "simsiam"])
def test_a_step_has_a_finite_loss_and_reaches_the_encoder(name, one_thread):
    recipe = TINY[name]()
    torch.manual_seed(0)
    objective, encoder = build_objective(recipe)
    assert isinstance(recipe.objective, type(objective).Config)
    out = objective(crops_batch(objective, n=4))
    assert torch.isfinite(out["loss"]), out
    out["loss"].backward()
    reached = [n for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, "no encoder parameter received a gradient"
    trainable = {id(p) for p in objective.parameters() if p.requires_grad}
    derived = dataclasses.replace(_derived(recipe), lr=0.1)
    optimized = {id(p) for group in make_optimizer(objective, recipe, derived).param_groups for p in group["params"]}
    assert optimized == trainable  # the objective's optimizer steps every trainable parameter, once


def _derived(recipe: Recipe):
    from sslvit.training.derived import derive

    return derive(recipe, 1, None)


@pytest.mark.parametrize("name", [*OBJECTIVES, "simsiam"])
def test_pretraining_calls_the_hooks_exports_for_timm_and_resumes_bit_identically(name, tmp_path, monkeypatch):
    cls, calls = OBJECTIVES[name], Counter()
    for hook in HOOKS:
        original = getattr(cls, hook)

        def spy(self, progress, _original=original, _hook=hook):
            calls[_hook] += 1
            return _original(self, progress)

        monkeypatch.setattr(cls, hook, spy)
    recipe = TINY[name]("train.checkpoint_every=1", "log.image_every=0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(recipe, tmp_path / "ref")
        assert calls == {hook: 2 for hook in HOOKS}
        # the same run stopped after step 1: its folder as the first checkpoint left it, then the same command
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "ref" / "config.json", tmp_path / "run" / "config.json")
        shutil.copytree(
            tmp_path / "ref" / "checkpoints" / "step_00000001", tmp_path / "run" / "checkpoints" / "step_00000001"
        )
        assert pretrain(recipe, tmp_path / "run")["steps_this_run"] == 1
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(tmp_path / "ref" / "encoder" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "run" / "encoder" / "model.safetensors"))
    assert [k for k in expected if not torch.equal(expected[k], resumed[k])] == []
    model = timm.create_model(f"local-dir:{tmp_path / 'ref' / 'encoder'}", pretrained=False)
    model.load_state_dict(expected, strict=True)  # every key of the export is the timm model's, and no key missing
